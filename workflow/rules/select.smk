rule select_series:
    """Quality-check every series and choose the one to score per visit."""
    input:
        series=rules.discover.output.series,
        visits=rules.discover.output.visits,
    output:
        series=f"{SHARDS_DIR}/{{shard}}/select/series.parquet",
        visits=f"{SHARDS_DIR}/{{shard}}/select/visits.parquet",
    params:
        settings=stage_settings("qc"),
    threads: config["resources"]["cpu_threads"]
    resources:
        mem_mb=config["resources"]["mem_mb"],
        runtime=config["resources"]["runtime_min"],
    conda:
        CONDA_ENV
    log:
        "results/logs/select/{shard}.log",
    shell:
        "cacflow stage select --series {input.series} --visits {input.visits} "
        "--settings {params.settings:q} "
        "--out-series {output.series} --out-visits {output.visits} 2>&1 | tee {log}"
