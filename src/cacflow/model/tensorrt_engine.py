"""TensorRT engine: built from the ONNX graph on the node that runs it, cached.

* Precision comes from the graph itself (TensorRT 11 removed the FP16 builder
  flag; networks are strongly typed): an fp16 ONNX export is built with the
  STRONGLY_TYPED flag, which TensorRT 10 supports too.
* One optimisation profile covers the batch and slice sizes the pipeline uses.
* The serialised engine is cached under a key made of the model hash, the
  TensorRT version, the GPU's compute capability and the profile, so any change
  of those rebuilds it; a timing cache speeds rebuilds up.
* Several jobs starting at once on one node build it once: the build holds an
  exclusive file lock and the others wait, then load the cached engine.

Only ``TensorRTEngine`` needs ``tensorrt`` and a GPU; the key, lock and profile
logic is plain Python, tested on CPU.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cacflow.atomic import atomic_write_bytes
from cacflow.model.engines import Engine, ModelFiles
from cacflow.model.preprocessing import N_INPUT_CHANNELS, SIZE_MULTIPLE


@dataclass(frozen=True)
class ShapeProfile:
    """min/opt/max of (batch, height, width); channels are fixed."""

    min_shape: tuple[int, int, int] = (1, SIZE_MULTIPLE, SIZE_MULTIPLE)
    opt_shape: tuple[int, int, int] = (16, 144, 144)  # a zoomed cardiac FOV at 1.5 mm
    max_shape: tuple[int, int, int] = (32, 352, 352)  # a 500 mm chest FOV at 1.5 mm, padded

    def full(self, shape: tuple[int, int, int]) -> tuple[int, int, int, int]:
        return (shape[0], N_INPUT_CHANNELS, shape[1], shape[2])

    def admits(self, batch_shape: tuple[int, ...]) -> bool:
        n, _, h, w = batch_shape
        return all(lo <= v <= hi for v, lo, hi in zip((n, h, w), self.min_shape, self.max_shape))


def engine_cache_key(model_sha256: str, tensorrt_version: str, compute_capability: tuple[int, int],
                     profile: ShapeProfile, precision: str) -> str:
    """A change in any part (weights, TensorRT, GPU architecture, shapes, precision) gives a new key."""
    parts = {
        "model": model_sha256,
        "tensorrt": tensorrt_version,
        "sm": f"{compute_capability[0]}.{compute_capability[1]}",
        "profile": asdict(profile),
        "precision": precision,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def default_cache_dir() -> Path:
    """Per-node cache: $CACFLOW_ENGINE_CACHE, else ~/.cache/cacflow/tensorrt."""
    return Path(os.environ.get("CACFLOW_ENGINE_CACHE", Path.home() / ".cache" / "cacflow" / "tensorrt"))


@contextmanager
def exclusive_lock(path: Path):
    """Block until this process holds an exclusive lock on ``path`` (released on exit)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def cached_build(cache_dir: Path, key: str, build) -> bytes:
    """Return the engine for ``key``, calling ``build() -> bytes`` at most once per
    node even when several processes ask at the same time."""
    engine_path = cache_dir / f"{key}.engine"
    if engine_path.exists():
        return engine_path.read_bytes()
    with exclusive_lock(cache_dir / f"{key}.lock"):
        if engine_path.exists():  # another job built it while we waited
            return engine_path.read_bytes()
        data = build()
        atomic_write_bytes(engine_path, data)
        return data


def export_fp16_onnx(model: ModelFiles, out_path: Path) -> Path:
    """The network in fp16, as an ONNX graph with fp16 input and output, so a strongly
    typed TensorRT network runs in fp16 (TensorRT 11 has no FP16 builder flag)."""
    import torch

    network = model.build_network().half()
    example = torch.randn(2, N_INPUT_CHANNELS, 64, 64, dtype=torch.float16)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        network, (example,), str(out_path), input_names=["inputs"], output_names=["logits"],
        dynamic_axes={"inputs": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch", 2: "height", 3: "width"}},
        opset_version=17, dynamo=False,
    )
    return out_path


class TensorRTEngine(Engine):
    name = "tensorrt"
    device = "cuda"
    precision = "fp16"

    def __init__(self, model: ModelFiles, profile: ShapeProfile | None = None, cache_dir: Path | None = None):
        import tensorrt as trt
        import torch

        self._torch = torch
        self._trt = trt
        self.profile = profile or ShapeProfile()
        cache_dir = Path(cache_dir or default_cache_dir())
        capability = torch.cuda.get_device_capability()
        key = engine_cache_key(model.network_sha256, trt.__version__, capability, self.profile, self.precision)
        self.cache_key = key
        logger = trt.Logger(trt.Logger.WARNING)
        serialized = cached_build(cache_dir, key, lambda: self._build(model, cache_dir, key, logger))
        self._runtime = trt.Runtime(logger)
        self._engine = self._runtime.deserialize_cuda_engine(serialized)
        self._context = self._engine.create_execution_context()
        self._stream = torch.cuda.Stream()

    def _build(self, model: ModelFiles, cache_dir: Path, key: str, logger) -> bytes:
        trt = self._trt
        onnx_path = export_fp16_onnx(model, cache_dir / f"{key}.fp16.onnx")
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(onnx_path.read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse the ONNX graph: {errors}")
        config = builder.create_builder_config()
        optimisation = builder.create_optimization_profile()
        optimisation.set_shape("inputs", self.profile.full(self.profile.min_shape),
                               self.profile.full(self.profile.opt_shape), self.profile.full(self.profile.max_shape))
        config.add_optimization_profile(optimisation)
        timing_path = cache_dir / "timing.cache"
        timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.exists() else b"")
        config.set_timing_cache(timing, ignore_mismatch=True)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError("TensorRT failed to build the engine (see the TensorRT log above)")
        atomic_write_bytes(timing_path, bytes(config.get_timing_cache().serialize()))
        return bytes(serialized)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        if not self.profile.admits(batch.shape):
            raise ValueError(f"batch shape {batch.shape} is outside the TensorRT profile {self.profile}")
        with torch.cuda.stream(self._stream):
            inputs = torch.from_numpy(np.ascontiguousarray(batch)).to("cuda", non_blocking=True).half()
            self._context.set_input_shape("inputs", tuple(inputs.shape))
            logits = torch.empty(tuple(self._context.get_tensor_shape("logits")), dtype=torch.float16, device="cuda")
            self._context.set_tensor_address("inputs", inputs.data_ptr())
            self._context.set_tensor_address("logits", logits.data_ptr())
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            result = logits.float().cpu()
        self._stream.synchronize()
        return result.numpy()
