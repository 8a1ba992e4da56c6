"""CPU engine A/B: the model's int8 graph against its float graph, engine time only.

Run by hand (not a test):  python tests/benchmarks/bench_int8.py [--scans 3] [--rounds 7] [--model DIR]

Both ONNX Runtime sessions live in one process and take turns on the same network
inputs (gated 512 x 512 phantoms, as bench_cpu.py), alternating which goes first in
each round, so a machine that speeds up or slows down during the run affects both
alike. Prints, per engine, the median over rounds of the engine seconds per scan, and
the ratio int8 / fp32 of each round (median and range).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--model", default="", help="model folder (default: the shipped model)")
    args = parser.parse_args()

    from cacflow.inference import BATCH_SLICES
    from cacflow.model.engines import ModelFiles, create_engine
    from cacflow.model.preprocessing import network_inputs
    from cacflow.synth.phantom import PhantomSettings, generate_phantom

    model = ModelFiles.chosen(args.model)
    if not model.int8_onnx_path.is_file():
        raise SystemExit(f"{model.directory} has no int8 graph ({model.int8_onnx_path.name})")
    scans = []
    for index in range(args.scans):
        phantom = generate_phantom(1000 + index, PhantomSettings(rows=512, cols=512, pixel_spacing_mm=0.39))
        scans.append(network_inputs(phantom.hu, phantom.spacing_mm)[0])
    engines = {kind: create_engine(kind, model) for kind in ("onnxruntime", "onnxruntime-fp32")}

    def seconds_per_scan(engine) -> float:
        started = time.perf_counter()
        for inputs in scans:
            for i in range(0, len(inputs), BATCH_SLICES):
                engine(inputs[i : i + BATCH_SLICES])
        return (time.perf_counter() - started) / len(scans)

    for engine in engines.values():  # warm-up: first runs allocate and plan
        seconds_per_scan(engine)
    times = {kind: [] for kind in engines}
    for round_index in range(args.rounds):
        order = list(engines) if round_index % 2 == 0 else list(engines)[::-1]
        for kind in order:
            times[kind].append(seconds_per_scan(engines[kind]))
    ratios = [a / b for a, b in zip(times["onnxruntime"], times["onnxruntime-fp32"])]

    print(f"machine: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, "
          f"python {platform.python_version()}")
    print(f"{args.scans} gated 512x512 scans ({', '.join(str(len(s)) for s in scans)} slices), {args.rounds} "
          f"alternating rounds; model {model.version} in {model.directory}")
    for kind, engine in engines.items():
        print(f"  {engine.label:22s} engine {statistics.median(times[kind]):.3f} s per scan (median of rounds)")
    print(f"  int8 / fp32 engine time: {statistics.median(ratios):.2f} (rounds {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
