"""GPU benchmark: inference scans per second per engine, end-to-end scans per second
with parallel CPU workers, and the model's FLOPs against the GPU's peak.

Run by hand on a GPU node (not a test):

    python tests/benchmarks/bench_gpu.py [--scans 16] [--repeats 5] [--workers 8]

It also runs without a GPU (``--device cpu``), so the script itself is checked on
CPU-only machines; the figures that matter are the GPU ones. Every figure is the
median of ``--repeats`` runs after a warm-up; ratios are against PyTorch fp32
measured in the same run. With ``$OUT`` set, the figures are also written to
``$OUT/bench_gpu.json``.

Engines measured (each where it can run):
- ``torch-fp32``: PyTorch, fp32 (the parity reference);
- ``torch-fp16``: the shipped PyTorch CUDA path (fp16 autocast, channels-last);
- ``torch-fp16-graph``: the same captured in a CUDA graph per batch shape, to see
  whether graphs help this small network (launch overhead);
- ``tensorrt``: the shipped TensorRT engine (cached fp16 engine), if installed;
- ``onnxruntime-cpu``: the CPU engine (the model's int8 copy, as a CPU node runs it), for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

# Dense fp16/bf16 tensor-core peak and fp32 (non-tensor) peak, FLOP/s, from NVIDIA's
# data sheets (SXM parts; PCIe H100: 756 / 51 TFLOPS).
GPU_PEAKS = {
    "H200": {"fp16": 989.4e12, "fp32": 66.9e12},
    "H100 PCIe": {"fp16": 756.0e12, "fp32": 51.2e12},
    "H100": {"fp16": 989.4e12, "fp32": 66.9e12},
}


def gpu_peak(name: str) -> dict | None:
    for key, peak in GPU_PEAKS.items():  # most specific first
        if key in name:
            return peak
    return None


def make_inputs(n_scans: int) -> list[np.ndarray]:
    """Network inputs of gated 512 x 512 generated scans (the CPU preprocessing done)."""
    from cacflow.model.preprocessing import network_inputs
    from cacflow.synth.phantom import PhantomSettings, generate_phantom

    inputs = []
    for index in range(n_scans):
        phantom = generate_phantom(2000 + index, PhantomSettings(rows=512, cols=512, pixel_spacing_mm=0.39))
        batch, _ = network_inputs(phantom.hu, phantom.spacing_mm)
        inputs.append(batch)
    return inputs


def count_flops(network, batch: np.ndarray) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        network(torch.from_numpy(batch))
    return float(counter.get_total_flops())


class TorchRunner:
    """PyTorch on ``device`` at ``precision``; optionally one CUDA graph per input shape."""

    def __init__(self, network, device: str, precision: str, graphs: bool = False):
        import torch

        self.torch, self.device, self.precision, self.graphs = torch, device, precision, graphs
        self.network = network.to(device)
        if device == "cuda":
            self.network = self.network.to(memory_format=torch.channels_last)
        self._graphs: dict[tuple, tuple] = {}

    def _forward(self, tensor):
        torch = self.torch
        if self.precision == "fp16":
            with torch.autocast(self.device, dtype=torch.float16):
                return self.network(tensor).float()
        return self.network(tensor)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            tensor = torch.from_numpy(batch).to(self.device, non_blocking=True)
            if self.device == "cuda":
                tensor = tensor.contiguous(memory_format=torch.channels_last)
            if not self.graphs:
                return self._forward(tensor).cpu().numpy()
            key = tuple(tensor.shape)
            if key not in self._graphs:
                static_in = tensor.clone()
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        self._forward(static_in)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static_out = self._forward(static_in)
                self._graphs[key] = (graph, static_in, static_out)
            graph, static_in, static_out = self._graphs[key]
            static_in.copy_(tensor)
            graph.replay()
            return static_out.cpu().numpy()


def engines_to_measure(device: str) -> dict:
    from cacflow.model.engines import ModelFiles, OnnxRuntimeEngine, tensorrt_available

    model = ModelFiles.packaged()
    engines = {"torch-fp32": TorchRunner(model.build_network(), device, "fp32")}
    if device == "cuda":
        engines["torch-fp16"] = TorchRunner(model.build_network(), device, "fp16")
        engines["torch-fp16-graph"] = TorchRunner(model.build_network(), device, "fp16", graphs=True)
        ok, why = tensorrt_available()
        if ok:
            from cacflow.model.tensorrt_engine import TensorRTEngine

            engines["tensorrt"] = TensorRTEngine(model)
        else:
            print(f"tensorrt not measured: {why}")
    engines["onnxruntime-cpu"] = OnnxRuntimeEngine(model, int8=True)  # what a CPU node runs (int8 copy)
    return engines


def time_inference(engine, inputs: list[np.ndarray], repeats: int, batch_slices: int, sync) -> float:
    """Median scans per second over ``repeats`` passes over all scans."""
    def one_pass():
        for scan in inputs:
            for start in range(0, len(scan), batch_slices):
                engine(scan[start:start + batch_slices])
        sync()

    one_pass()  # warm-up: kernels, graphs, engine build
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        one_pass()
        rates.append(len(inputs) / (time.perf_counter() - started))
    return statistics.median(rates)


def _prepare(folder: str):
    """The CPU part of one scan: discover, QC, dcm2niix, load, network inputs."""
    from cacflow import pipeline
    from cacflow.config import load_config
    from cacflow.convert import load_volume
    from cacflow.manifest import VisitEntry
    from cacflow.model.preprocessing import network_inputs

    config = load_config()
    series, visit = pipeline.discover_entry(VisitEntry("B", "1", folder))
    _, visit = pipeline.select_visit(series, visit, config)
    work = tempfile.mkdtemp(prefix="bench-gpu-")
    pipeline.convert_visit(visit, Path(work), config)
    volume = load_volume(visit["nifti_path"], visit.get("slice_thickness_mm"))
    inputs, grid = network_inputs(volume.hu, volume.spacing_mm)
    return visit, volume, inputs, grid


def time_end_to_end(engine, folders: list[str], workers: int, batch_slices: int) -> float:
    """Scans per second, DICOM folder to scores: CPU stages on ``workers`` processes,
    the engine, candidate vote and scoring in this process as results arrive."""
    from concurrent.futures import ProcessPoolExecutor

    from cacflow import pipeline
    from cacflow.config import load_config
    from cacflow.inference import assign_candidates

    config = load_config()
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for visit, volume, inputs, grid in pool.map(_prepare, folders):
            logits = np.concatenate([engine(inputs[i:i + batch_slices]) for i in range(0, len(inputs), batch_slices)])
            labels, *_ = assign_candidates(volume.hu, logits, grid, 130.0)
            pipeline.score_visit(visit, volume, labels, config)
    return len(folders) / (time.perf_counter() - started)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=min(8, len(os.sched_getaffinity(0))))
    parser.add_argument("--batch-slices", type=int, default=64)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--e2e-scans", type=int, default=None, help="scans for the end-to-end run (default --scans)")
    args = parser.parse_args()

    from cacflow.model.engines import ModelFiles

    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    gpu_name = torch.cuda.get_device_name(0) if args.device == "cuda" else None
    print(f"machine: {platform.machine()}, {len(os.sched_getaffinity(0))} cores, python {platform.python_version()}, "
          f"torch {torch.__version__}, device {gpu_name or 'cpu'}")
    inputs = make_inputs(args.scans)
    slices = statistics.median(len(scan) for scan in inputs)
    flops = statistics.median(count_flops(ModelFiles.packaged().build_network(), scan) for scan in inputs[:3])
    print(f"{args.scans} gated 512x512 scans, median {slices:.0f} slices on the 1.5 mm grid "
          f"({inputs[0].shape[2]}x{inputs[0].shape[3]}); model {flops / 1e9:.2f} GFLOP per scan")

    figures = {"device": gpu_name or "cpu", "cores": len(os.sched_getaffinity(0)), "scans": args.scans,
               "repeats": args.repeats, "gflop_per_scan": flops / 1e9, "inference_scans_per_s": {},
               "fraction_of_peak": {}}
    peak = gpu_peak(gpu_name) if gpu_name else None
    engines = engines_to_measure(args.device)
    for name, engine in engines.items():
        rate = time_inference(engine, inputs, args.repeats, args.batch_slices,
                              sync if name != "onnxruntime-cpu" else (lambda: None))
        figures["inference_scans_per_s"][name] = rate
        line = f"inference {name:18s} {rate:8.1f} scans/s"
        if peak and name != "onnxruntime-cpu":
            precision = "fp32" if name == "torch-fp32" else "fp16"
            fraction = rate * flops / peak[precision]
            figures["fraction_of_peak"][name] = fraction
            line += f"   {rate * flops / 1e12:6.2f} TFLOP/s = {100 * fraction:.2f} % of the {precision} peak"
        print(line)
    base = figures["inference_scans_per_s"]["torch-fp32"]
    for name, rate in figures["inference_scans_per_s"].items():
        print(f"  {name} / torch-fp32: {rate / base:.2f}x")

    from cacflow.synth.dicom_writer import write_series
    from cacflow.synth.phantom import PhantomSettings, generate_phantom

    n_e2e = args.e2e_scans or args.scans
    best = "tensorrt" if "tensorrt" in engines else ("torch-fp16" if args.device == "cuda" else "onnxruntime-cpu")
    with tempfile.TemporaryDirectory() as scratch:
        folders = []
        for index in range(n_e2e):
            phantom = generate_phantom(3000 + index, PhantomSettings(rows=512, cols=512, pixel_spacing_mm=0.39))
            folder = Path(scratch) / f"scan{index}"
            write_series(phantom, folder, series_kind="calcium_score",
                         uids={"study": f"1.2.3.{index}.1", "series": f"1.2.3.{index}.2"})
            folders.append(str(folder))
        time_end_to_end(engines[best], folders[:2], args.workers, args.batch_slices)  # warm-up
        rates = [time_end_to_end(engines[best], folders, args.workers, args.batch_slices)
                 for _ in range(max(1, args.repeats // 2))]
    figures["end_to_end"] = {"engine": best, "workers": args.workers, "scans_per_s": statistics.median(rates)}
    print(f"end to end ({best}, {args.workers} CPU workers): {statistics.median(rates):.2f} scans/s "
          f"(median of {len(rates)} runs of {n_e2e} scans)")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_gpu.json").write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
