# Held-out evaluation: `snakemake evaluate --cores all`.
# Generates a cohort with a seed used nowhere else (not the demo's, not training's),
# scores every visit with the config's `model` (normally the shipped one), and compares
# the scores with the cohort's ground truth in the form of Eng et al. 2021
# (docs/evaluation.md).
# Settings: the optional `evaluation:` config section; these are the defaults.

EVALUATION = {
    "participants": 120,
    "seed": 777001,
    "bootstrap": 2000,
    "bootstrap_seed": 0,
    **config.get("evaluation", {}),
}
EVALUATION_DIR = "results/evaluation"
# Seeds the held-out cohort must not share: the demo cohort's and the training set's.
_SEEDS_IN_USE = {config["demo"]["seed"]: "the demo cohort", 20261126: "model training"}
if EVALUATION["seed"] in _SEEDS_IN_USE:
    raise ValueError(
        f"evaluation.seed {EVALUATION['seed']} is the seed of {_SEEDS_IN_USE[EVALUATION['seed']]}; "
        "a held-out cohort needs a seed used nowhere else"
    )


rule evaluation_cohort:
    """Generate the held-out cohort (DICOM, manifest, ground truth)."""
    output:
        manifest=f"{EVALUATION_DIR}/cohort/manifest.tsv",
        reference=f"{EVALUATION_DIR}/cohort/ground_truth/reference_scores.tsv",
        # Declared so that Snakemake deletes it before generating again (another seed:
        # cohort B, docs/evaluation.md); the old cohort's series must not stay beside the new.
        dicom=directory(f"{EVALUATION_DIR}/cohort/dicom"),
    params:
        participants=EVALUATION["participants"],
        seed=EVALUATION["seed"],
        # What reference_scores.tsv holds. A cohort generated before the image-based
        # columns existed is generated again (same seed, same scans), not reported on.
        reference_scores="noise-free and image-based",
        out_dir=lambda wildcards, output: os.path.dirname(output.manifest),
    threads: 2
    conda:
        CONDA_ENV
    log:
        "results/logs/evaluation_cohort.log",
    shell:
        "cacflow synth {params.out_dir} --size demo --participants {params.participants} "
        "--seed {params.seed} --workers {threads} > {log} 2>&1"


rule evaluation_scores:
    """Score every visit of the held-out cohort with `cacflow score-scan`'s logic
    into a scans-like Parquet (one visit's failure is recorded, not fatal)."""
    input:
        manifest=rules.evaluation_cohort.output.manifest,
    output:
        scans=f"{EVALUATION_DIR}/scans.parquet",
    params:
        engine=config["engine"],
        settings=stage_settings("qc", "scoring"),
        model=model_setting(),
        model_fingerprint=model_fingerprint,
    threads: config["resources"]["infer_threads"]
    resources:
        mem_mb=config["resources"]["mem_mb"],
        runtime=config["resources"]["runtime_min"],
        gpu=1,
    conda:
        CONDA_ENV
    log:
        "results/logs/evaluation_scores.log",
    shell:
        "CACFLOW_THREADS={threads} cacflow evaluate --score-manifest {input.manifest} "
        "--predicted {output.scans} --engine {params.engine} --model={params.model:q} "
        "--settings {params.settings:q} > {log} 2>&1"


# One line of each report's Run table: the cohort it compares.
EVALUATION_COHORT_INFO = (
    f"held-out cohort=cacflow synth --size demo --participants {EVALUATION['participants']} "
    f"--seed {EVALUATION['seed']}"
)


rule evaluation_report:
    """The evaluation report (HTML) and tidy metrics (CSV, Parquet) against the
    cohort's reference scores (the plaques' noise-free renderings)."""
    input:
        scans=rules.evaluation_scores.output.scans,
        reference=rules.evaluation_cohort.output.reference,
    output:
        html=f"{EVALUATION_DIR}/report.html",
        csv=f"{EVALUATION_DIR}/metrics.csv",
        parquet=f"{EVALUATION_DIR}/metrics.parquet",
        pairs=f"{EVALUATION_DIR}/pairs.csv",
    params:
        bootstrap=EVALUATION["bootstrap"],
        bootstrap_seed=EVALUATION["bootstrap_seed"],
        cohort=EVALUATION_COHORT_INFO,
        out_dir=lambda wildcards, output: os.path.dirname(output.html),
    conda:
        CONDA_ENV
    log:
        "results/logs/evaluate.log",
    shell:
        "cacflow evaluate --predicted {input.scans} --reference {input.reference} "
        "--out-dir {params.out_dir} --bootstrap {params.bootstrap} --seed {params.bootstrap_seed} "
        "--run-info {params.cohort:q} > {log} 2>&1"


# Beside the noise-free scores the cohort records what each scored series shows of
# the same plaques, noise included, as a reader would score it (image_agatston_*); at
# the 130 HU / 1 mm^2 edge the two differ. This second report compares with those, so
# a miss the image cannot show is told apart from one the model made
# (docs/evaluation.md). A rule of its own: the primary report never waits on it.
rule evaluation_image_reference_report:
    """The same report against the cohort's image-based reference scores."""
    input:
        scans=rules.evaluation_scores.output.scans,
        reference=rules.evaluation_cohort.output.reference,
    output:
        html=f"{EVALUATION_DIR}/image_reference/report.html",
        csv=f"{EVALUATION_DIR}/image_reference/metrics.csv",
        parquet=f"{EVALUATION_DIR}/image_reference/metrics.parquet",
        pairs=f"{EVALUATION_DIR}/image_reference/pairs.csv",
    params:
        bootstrap=EVALUATION["bootstrap"],
        bootstrap_seed=EVALUATION["bootstrap_seed"],
        cohort=EVALUATION_COHORT_INFO,
        out_dir=lambda wildcards, output: os.path.dirname(output.html),
    conda:
        CONDA_ENV
    log:
        "results/logs/evaluate_image_reference.log",
    shell:
        "cacflow evaluate --predicted {input.scans} --reference {input.reference} --image-reference "
        "--title 'cacflow evaluation: predicted vs image-based reference' "
        "--out-dir {params.out_dir} --bootstrap {params.bootstrap} --seed {params.bootstrap_seed} "
        "--run-info {params.cohort:q} > {log} 2>&1"


rule evaluate:
    """Target: both evaluation reports, against the noise-free and the image-based
    reference scores."""
    input:
        rules.evaluation_report.output.html,
        rules.evaluation_image_reference_report.output.html,
    localrule: True
