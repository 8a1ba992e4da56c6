checkpoint plan_shards:
    """Assign manifest rows to shards. Existing shards keep their members for
    ever; visits new to the manifest go to new shards; withdrawn participants
    are never scheduled."""
    input:
        manifest=manifest_path(),
        withdrawals=withdrawals_file,
    output:
        plan=f"{SHARDS_DIR}/plan.tsv",
    params:
        shard_size=config["shard_size"],
        shards_dir=lambda wildcards, output: os.path.dirname(output.plan),
        withdrawals=lambda wildcards, input: f"--withdrawals {input.withdrawals}" if input.withdrawals else "",
    conda:
        CONDA_ENV
    log:
        "results/logs/plan_shards.log",
    shell:
        "cacflow stage plan --manifest {input.manifest} --shards-dir {params.shards_dir} "
        "--shard-size {params.shard_size} {params.withdrawals} --out {output.plan} > {log} 2>&1"
