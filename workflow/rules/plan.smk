checkpoint plan_shards:
    """Assign manifest rows to shards. Existing shards keep their members for
    ever; visits new to the manifest go to new shards."""
    input:
        manifest=manifest_path(),
    output:
        plan=f"{SHARDS_DIR}/plan.tsv",
    params:
        shard_size=config["shard_size"],
    log:
        "results/logs/plan_shards.log",
    shell:
        "cacflow stage plan --manifest {input.manifest} --shards-dir " + SHARDS_DIR + " "
        "--shard-size {params.shard_size} --out {output.plan} > {log} 2>&1"
