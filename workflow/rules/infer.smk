rule infer:
    """Label coronary calcium per vessel. One job per shard loads the engine once
    and streams every volume of the shard through it."""
    input:
        visits=rules.convert.output.visits,
    output:
        # Label volumes go beside it, in labels/ (listed in this table, as for convert).
        visits=f"{SHARDS_DIR}/{{shard}}/infer/visits.parquet",
    params:
        labels_dir=lambda wildcards, output: os.path.join(os.path.dirname(output.visits), "labels"),
        engine=config["engine"],
        settings=stage_settings("scoring"),
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
        "results/logs/infer/{shard}.log",
    shell:
        "CACFLOW_THREADS={threads} cacflow stage infer --visits {input.visits} "
        "--engine {params.engine} --model={params.model:q} --settings {params.settings:q} "
        "--labels-dir {params.labels_dir} --out-visits {output.visits} 2>&1 | tee {log}"
