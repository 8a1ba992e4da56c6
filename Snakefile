# cacflow: coronary artery calcium scores for CT cohorts.
# One command runs the whole chain; see README.md. The logic lives in the
# `cacflow` Python package; the rules below only wire its stages together.

import os

from snakemake.utils import min_version, validate

min_version("9.0")


# Defaults live beside this file, so `--directory` can point the outputs anywhere.
configfile: os.path.join(workflow.basedir, "config/config.yaml")


validate(config, "config/schema/config.schema.yaml")

# envs/cacflow.yaml installs the project from here (`--sdm conda`).
os.environ.setdefault("CACFLOW_ROOT", workflow.basedir)


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/plan.smk"
include: "workflow/rules/discover.smk"
include: "workflow/rules/select.smk"
include: "workflow/rules/convert.smk"
include: "workflow/rules/infer.smk"
include: "workflow/rules/score.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    input:
        COHORT_TABLES,
        "results/cohort/data_dictionary.csv",
        "results/cohort/data_dictionary.md",
        "results/cohort/report.html",
    default_target: True
