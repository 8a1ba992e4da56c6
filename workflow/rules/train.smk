rule train:
    """Train CalciumNet (seeded, resumable): `snakemake train`. On generated phantoms
    (the members, then the optional negatives tune: config `training`), or, with
    `training: coca_root:` set, fine-tuned from the shipped model on the
    COCA-format annotations there. Writes a candidate model to results/model/
    (with calciumnet.int8.onnx, the CPU engine's copy, except after a COCA fine-tune);
    copy every file of it to src/cacflow/model/weights/ to ship it."""
    output:
        weights="results/model/calciumnet.pt",
        onnx="results/model/calciumnet.onnx",
        info="results/model/model.json",
    params:
        arguments=training_arguments(),
    # A fixed request: on a cluster the core count is not known when rules are read.
    threads: 8
    resources:
        # Used when there is one (`training: device: auto`); see docs/slurm.md for
        # clusters without GPUs.
        gpu=1,
    conda:
        CONDA_ENV
    log:
        "results/logs/train.log",
    shell:
        "cacflow train {params.arguments} --model-dir results/model > {log} 2>&1"
