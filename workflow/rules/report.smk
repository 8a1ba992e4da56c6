rule report:
    """The cohort QC report: one self-contained HTML file."""
    input:
        tables=COHORT_TABLES,
        infer=per_shard(rules.infer.output.visits),
    output:
        html="results/cohort/report.html",
    conda:
        CONDA_ENV
    log:
        "results/logs/report.log",
    shell:
        "cacflow stage report --cohort-dir results/cohort --infer {input.infer} "
        "--out {output.html} > {log} 2>&1"
