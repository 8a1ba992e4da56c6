rule aggregate:
    """Build the cohort Parquet tables from the shards (atomic writes)."""
    input:
        plan=rules.plan_shards.output.plan,
        scans=per_shard(rules.score.output.scans),
        lesions=per_shard(rules.score.output.lesions),
        series=per_shard(rules.select_series.output.series),
        reference=reference_scores,
        withdrawals=withdrawals_file,
    output:
        scans="results/cohort/scans.parquet",
        lesions="results/cohort/lesions.parquet",
        series="results/cohort/series.parquet",
        runs="results/cohort/runs.parquet",
    params:
        withdrawals=lambda wildcards, input: f"--withdrawals {input.withdrawals}" if input.withdrawals else "",
        reference=lambda wildcards, input: " ".join(f"--reference {path}" for path in input.reference),
    conda:
        CONDA_ENV
    log:
        "results/logs/aggregate.log",
    shell:
        "cacflow stage aggregate --scans {input.scans} --lesions {input.lesions} "
        "--series {input.series} --plan {input.plan} {params.reference} {params.withdrawals} "
        "--out-dir results/cohort > {log} 2>&1"


rule data_dictionary:
    """Every column of every cohort table: type, unit, definition, allowed values."""
    output:
        csv="results/cohort/data_dictionary.csv",
        md="results/cohort/data_dictionary.md",
    conda:
        CONDA_ENV
    log:
        "results/logs/data_dictionary.log",
    shell:
        "cacflow stage dictionary --out-dir results/cohort > {log} 2>&1"
