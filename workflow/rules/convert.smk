rule convert:
    """Convert each chosen series to NIfTI with dcm2niix and check its geometry."""
    input:
        visits=rules.select_series.output.visits,
    output:
        visits=f"{SHARDS_DIR}/{{shard}}/convert/visits.parquet",
        nifti=directory(f"{SHARDS_DIR}/{{shard}}/convert/nifti"),
    threads: config["resources"]["cpu_threads"]
    resources:
        mem_mb=config["resources"]["mem_mb"],
        runtime=config["resources"]["runtime_min"],
    conda:
        CONDA_ENV
    log:
        "results/logs/convert/{shard}.log",
    shell:
        "cacflow stage convert --visits {input.visits} --nifti-dir {output.nifti} "
        "--out-visits {output.visits} > {log} 2>&1"
