"""CPU benchmark: seconds per gated 512 x 512 scan, DICOM folder to scores.

Run by hand (not a test):  python tests/benchmarks/bench_cpu.py [--scans 4] [--repeats 3]
(the identifier leak test runs it once, tiny, with planted identifiers).

Generates gated calcium-score series (real DICOM), then times each stage of the
per-visit path the workflow runs (discover, QC + select, dcm2niix, load, network
preprocessing / engine / candidate vote, score; "convert" includes the blood-pool
contrast and image noise measurements, and the noise measurement is also timed on its
own) for every scan, several times, and prints medians. Each engine runs in its own
process so its peak memory (max RSS) is measured alone. The ONNX Runtime engine is compared with PyTorch on the CPU, both
measured in this run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path


def make_scans(out_dir: Path, n_scans: int, tags: dict | None = None) -> list[Path]:
    from pydicom.uid import generate_uid

    from cacflow.synth.dicom_writer import write_series
    from cacflow.synth.phantom import PhantomSettings, generate_phantom

    folders = []
    for index in range(n_scans):
        phantom = generate_phantom(1000 + index, PhantomSettings(rows=512, cols=512, pixel_spacing_mm=0.39))
        folder = out_dir / f"scan{index}"
        uids = {"study": generate_uid(entropy_srcs=[f"bench-study-{index}"]),
                "series": generate_uid(entropy_srcs=[f"bench-series-{index}"])}
        write_series(phantom, folder, series_kind="calcium_score", uids=uids, tags=tags)
        folders.append(folder)
    return folders


def time_engine(engine: str, folders: list[str], repeats: int, queue, model_dir: str = "") -> None:
    from cacflow import pipeline
    from cacflow.config import load_config
    from cacflow.convert import load_volume
    from cacflow.manifest import VisitEntry
    from cacflow.pixel_noise import pixel_noise_hu

    config = load_config()
    config["model"] = model_dir
    started = time.perf_counter()
    inferer = pipeline.Inferer(engine, config)
    load_seconds = time.perf_counter() - started
    stages: dict[str, list[float]] = {}
    within_convert: dict[str, list[float]] = {}  # parts of the convert stage, timed again alone
    totals = []
    with tempfile.TemporaryDirectory() as work:
        for repeat in range(repeats):
            for index, folder in enumerate(folders):
                clock = {}
                t = time.perf_counter()
                series, visit = pipeline.discover_entry(VisitEntry(f"B{index}", str(repeat), folder))
                clock["discover"] = time.perf_counter() - t
                t = time.perf_counter()
                _, visit = pipeline.select_visit(series, visit, config)
                clock["qc_select"] = time.perf_counter() - t
                t = time.perf_counter()
                pipeline.convert_visit(visit, Path(work), config)
                clock["convert"] = time.perf_counter() - t
                t = time.perf_counter()
                volume = load_volume(visit["nifti_path"], visit.get("slice_thickness_mm"))
                clock["load_nifti"] = time.perf_counter() - t
                t = time.perf_counter()
                pixel_noise_hu(volume.hu, float(volume.spacing_mm[1]))
                within_convert.setdefault("image_noise", []).append(time.perf_counter() - t)
                segmentation = inferer.segmenter.segment(volume.hu, volume.spacing_mm, scan_type=visit["scan_type"])
                clock["infer_preprocess"] = segmentation.seconds_preprocess
                clock["infer_engine"] = segmentation.seconds_engine
                clock["infer_vote"] = segmentation.seconds_postprocess
                t = time.perf_counter()
                pipeline.score_visit(visit, volume, segmentation.labels, config)
                clock["score"] = time.perf_counter() - t
                for stage, seconds in clock.items():
                    stages.setdefault(stage, []).append(seconds)
                totals.append(sum(clock.values()))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put({"engine": inferer.engine.label, "model_load_s": load_seconds, "total_median_s": statistics.median(totals),
               "stages_median_s": {k: statistics.median(v) for k, v in stages.items()},
               "within_convert_median_s": {k: statistics.median(v) for k, v in within_convert.items()},
               "peak_rss_mb": peak_mb,
               "n_measurements": len(totals)})


def inference_step_s(result: dict) -> float:
    """Input preparation + engine + vote: the model's share of a scan (the latency budget)."""
    return sum(result["stages_median_s"][stage] for stage in ("infer_preprocess", "infer_engine", "infer_vote"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", nargs="+", default=["onnxruntime", "onnxruntime-fp32", "torch"],
                        help="engines to time; ratios are against the last one")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--identifiers", type=json.loads, default=None,
                        help="JSON object of DICOM keyword -> value written into every scan (leak test)")
    parser.add_argument("--model", default="", help="time the model in this folder (model.json, calciumnet.pt "
                        "and .onnx) instead of the shipped one, e.g. an earlier export of it")
    parser.add_argument("--keep-dicom", type=Path, default=None, help="write the generated scans here and keep them")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        folders = [str(f) for f in make_scans(args.keep_dicom or Path(scratch), args.scans, args.identifiers)]
        context = multiprocessing.get_context("spawn")
        for engine in args.engines:
            queue = context.Queue()
            process = context.Process(target=time_engine, args=(engine, folders, args.repeats, queue, args.model))
            process.start()
            results.append(queue.get())
            process.join()
    print(f"machine: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, "
          f"python {platform.python_version()}")
    print(f"{args.scans} gated 512x512 scans x {args.repeats} repeats per engine; medians per scan; "
          f"model {args.model or 'shipped'}")
    for result in results:
        print(f"\nengine {result['engine']}: {result['total_median_s']:.2f} s per scan end to end, "
              f"peak memory {result['peak_rss_mb']:.0f} MB, model load {result['model_load_s']:.2f} s")
        for stage, seconds in result["stages_median_s"].items():
            print(f"  {stage:18s} {seconds:6.3f} s")
        for part, seconds in result["within_convert_median_s"].items():
            print(f"  ({part} within convert: {seconds:.3f} s)")
    if len(results) > 1:
        base = results[-1]
        for result in results[:-1]:
            print(f"\n{result['engine']} / {base['engine']}: "
                  f"{result['total_median_s'] / base['total_median_s']:.2f}x end-to-end time, "
                  f"{inference_step_s(result) / inference_step_s(base):.2f}x inference step "
                  f"({inference_step_s(result):.3f} s vs {inference_step_s(base):.3f} s), "
                  f"{result['stages_median_s']['infer_engine'] / base['stages_median_s']['infer_engine']:.2f}x engine time")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
