rule score:
    """Agatston, volume and mass per lesion, vessel and scan."""
    input:
        visits=rules.infer.output.visits,
        series=rules.select_series.output.series,
    output:
        scans=f"{SHARDS_DIR}/{{shard}}/score/scans.parquet",
        lesions=f"{SHARDS_DIR}/{{shard}}/score/lesions.parquet",
    params:
        settings=stage_settings("scoring"),
    threads: config["resources"]["cpu_threads"]
    resources:
        mem_mb=config["resources"]["mem_mb"],
        runtime=config["resources"]["runtime_min"],
    conda:
        CONDA_ENV
    log:
        "results/logs/score/{shard}.log",
    shell:
        "cacflow stage score --visits {input.visits} --settings {params.settings:q} "
        "--out-scans {output.scans} --out-lesions {output.lesions} 2>&1 | tee {log}"
