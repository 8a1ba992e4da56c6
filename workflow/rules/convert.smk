rule convert:
    """Convert each chosen series to NIfTI with dcm2niix, check its geometry and
    measure the blood pool (contrast from the image, whatever the tags say)."""
    input:
        visits=rules.select_series.output.visits,
    output:
        # The NIfTI volumes go beside it, in nifti/ (listed in this table, not declared:
        # a withdrawal deletes single volumes without making the shard look out of date).
        visits=f"{SHARDS_DIR}/{{shard}}/convert/visits.parquet",
    params:
        nifti_dir=lambda wildcards, output: os.path.join(os.path.dirname(output.visits), "nifti"),
        settings=stage_settings("qc"),
    threads: config["resources"]["cpu_threads"]
    resources:
        mem_mb=config["resources"]["mem_mb"],
        runtime=config["resources"]["runtime_min"],
    conda:
        CONDA_ENV
    log:
        "results/logs/convert/{shard}.log",
    shell:
        "cacflow stage convert --visits {input.visits} --nifti-dir {params.nifti_dir} "
        "--settings {params.settings:q} --out-visits {output.visits} 2>&1 | tee {log}"
