rule discover:
    """Read the DICOM headers (no pixels) of every file of the shard's visits.
    Headers of files unchanged since the shard's last discovery (same path, size
    and modification time) come from discover/header_cache.parquet, which is not a
    declared output: it survives reruns, so rediscovering reads only what changed."""
    input:
        members=f"{SHARDS_DIR}/{{shard}}/members.tsv",
    output:
        series=f"{SHARDS_DIR}/{{shard}}/discover/series.parquet",
        visits=f"{SHARDS_DIR}/{{shard}}/discover/visits.parquet",
    threads: config["resources"]["cpu_threads"]
    resources:
        mem_mb=config["resources"]["mem_mb"],
        runtime=config["resources"]["runtime_min"],
    conda:
        CONDA_ENV
    log:
        "results/logs/discover/{shard}.log",
    shell:
        "cacflow stage discover --members {input.members} "
        "--out-series {output.series} --out-visits {output.visits} 2>&1 | tee {log}"
