rule demo_cohort:
    """Generate the built-in demo cohort: real DICOM series with planted
    identifiers, plus ground truth written beside (never inside) the DICOM."""
    output:
        manifest="results/demo/manifest.tsv",
        reference="results/demo/ground_truth/reference_scores.tsv",
        # Declared so that Snakemake deletes it before generating again (another seed
        # or size): a new cohort must not sit beside the old one's series.
        dicom=directory("results/demo/dicom"),
    params:
        participants=config["demo"]["participants"],
        seed=config["demo"]["seed"],
    conda:
        CONDA_ENV
    log:
        "results/logs/demo_cohort.log",
    shell:
        "cacflow synth results/demo --participants {params.participants} "
        "--seed {params.seed} --size demo > {log} 2>&1"
