# Shared helpers for the rules: paths, settings passed to stages, shard lookup.
import functools
import hashlib
import json
import shlex

SHARDS_DIR = "results/shards"
# One software environment for all steps; conda paths are relative to the rules folder.
CONDA_ENV = "../../envs/cacflow.yaml"
COHORT_TABLES = [
    "results/cohort/scans.parquet",
    "results/cohort/lesions.parquet",
    "results/cohort/series.parquet",
    "results/cohort/runs.parquet",
]


def manifest_path():
    """The cohort manifest: the user's TSV, or the generated demo cohort's."""
    if config["manifest"] == "demo":
        return "results/demo/manifest.tsv"
    return config["manifest"]


def stage_settings(*sections):
    """Config sections a stage depends on, as one JSON string. Passed as a param,
    so changing a setting reruns exactly the stages that use it."""
    return json.dumps({section: config[section] for section in sections}, sort_keys=True)


MODEL_FILES = ("model.json", "calciumnet.pt", "calciumnet.onnx")
# The graph's 8-bit copy that the CPU engine runs; models trained before it lack it.
OPTIONAL_MODEL_FILES = ("calciumnet.int8.onnx",)


def model_setting():
    """The config's `model` as the inference rules pass it: "" (the shipped model) or the
    folder, normalised so that `./results/model` and `results/model` are one setting.
    Relative folders are relative to the working directory (`--directory`)."""
    return os.path.normpath(config["model"]) if config["model"] else ""


def model_fingerprint(wildcards):
    """SHA-256 over the model's files. A param of the inference rules, so other weights,
    ONNX graphs or model.json, even in the same folder, rerun inference. An input
    function: only a run that infers needs the folder (`snakemake train` makes it)."""
    return _model_fingerprint()


@functools.cache
def _model_fingerprint():
    """Hashed once per Snakemake run, not once per shard's job (hundreds in a cohort)."""
    folder = model_setting() or os.path.join(workflow.basedir, "src", "cacflow", "model", "weights")
    missing = [name for name in MODEL_FILES if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise ValueError(
            f"config model: {folder} lacks {', '.join(missing)}; point it at the output folder of "
            "`snakemake train` (results/model), or leave it empty for the shipped model"
        )
    digest = hashlib.sha256()
    present = [name for name in OPTIONAL_MODEL_FILES if os.path.isfile(os.path.join(folder, name))]
    for name in MODEL_FILES + tuple(present):
        with open(os.path.join(folder, name), "rb") as handle:
            digest.update(handle.read())
    return digest.hexdigest()


def shard_ids():
    plan = checkpoints.plan_shards.get().output.plan
    with open(plan) as handle:
        next(handle)  # header
        return sorted({line.split("\t")[0] for line in handle if line.strip()})


def per_shard(pattern):
    """Input function: `pattern` (with {shard}) for every shard of the plan."""

    def inputs(wildcards):
        return expand(pattern, shard=shard_ids())

    return inputs


def reference_scores(wildcards):
    """Ground truth of the demo cohort, so the run reports predicted vs reference."""
    return ["results/demo/ground_truth/reference_scores.tsv"] if config["manifest"] == "demo" else []


def withdrawals_file(wildcards):
    """The withdrawals list, as an input: editing it rebuilds the cohort tables."""
    return [config["withdrawals"]] if config["withdrawals"] else []


def training_arguments():
    """`cacflow train` arguments: phantoms (the members, then the optional negatives tune), or
    fine-tuning the shipped model on COCA."""
    training = config.get("training", {})
    device = f"--device {training.get('device', 'auto')}"
    if training.get("coca_root"):
        return (
            f"--work-dir results/training_coca --coca-root {shlex.quote(str(training['coca_root']))} "
            f"--init-weights packaged --steps {training.get('fine_tune_steps', 2000)} "
            f"--learning-rate {training.get('fine_tune_learning_rate', 0.0005)} {device}"
        )
    # No members in the config: `cacflow train` trains the shipped model's members.
    members = ",".join(f"{m['volumes']}:{m['steps']}" for m in training.get("members", []))
    # "shipped" (the default), null, or a mapping: a user's mapping replaces the default
    # whole (Snakemake merges mappings key by key, so the default is not one).
    tune = training.get("negatives_tune", "shipped")
    if tune == "shipped" or not tune:
        tune = f"--negatives-tune {tune or 'none'}"
    else:
        tune = (f"--negatives-tune {tune['volumes']}:{tune['steps']} --negatives-tune-learning-rate "
                f"{tune['learning_rate']}" + (" --negatives-tune-perivascular" if tune.get("perivascular_calcium") else "")
                + (" --negatives-tune-specks" if tune.get("speck_lesions") else ""))
    review = "--review-phantoms {}:{}".format(*training.get("review_phantoms", [0, 0]))
    patch_counts = training.get("patch_review_phantoms", [0, 0, 0])
    if sum(patch_counts):  # named only when asked for: the usual command line stays as it was
        review += " --patch-review-phantoms {} --patch-review-min-share {}".format(
            ":".join(str(n) for n in patch_counts), training.get("patch_review_min_share", 0.01))
        if training.get("patch_review_context", False):
            review += " --patch-review-context"
        scan_types = training.get("patch_review_scan_types", ["gated", "nongated"])
        if sorted(scan_types) != ["gated", "nongated"]:
            review += " --patch-review-scan-types " + ",".join(scan_types)
    # Named only when asked for, as above.
    inputs = "" if training.get("input_set", "standard") == "standard" else f" --input-set {training['input_set']}"
    if training.get("artery_loss_weight", 0.0):
        inputs += f" --artery-loss-weight {training['artery_loss_weight']}"
    return f"--work-dir results/training {f'--members {members} ' if members else ''}{tune} {review}{inputs} {device}"
