rule train:
    """Train CalciumNet on generated phantoms (seeded, resumable): `snakemake train`.
    Writes a candidate model to results/model/; copy it to
    src/cacflow/model/weights/ to ship it."""
    output:
        weights="results/model/calciumnet.pt",
        onnx="results/model/calciumnet.onnx",
        info="results/model/model.json",
    # A fixed request: on a cluster the core count is not known when rules are read.
    threads: 8
    conda:
        CONDA_ENV
    log:
        "results/logs/train.log",
    shell:
        "cacflow train --work-dir results/training --model-dir results/model > {log} 2>&1"
