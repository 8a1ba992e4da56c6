"""Inference engines behind one interface.

Every engine takes a float32 batch ``[n, C, H, W]`` (see ``preprocessing``) and
returns float32 logits ``[n, N_CLASSES, H, W]``. The engine is created once per
job and reused for every scan (peers reload their model per image; we do not).

``auto`` picks TensorRT when it is importable and a GPU is present, else PyTorch
on CUDA, else ONNX Runtime on the CPU. ``onnxruntime`` runs the model's 8-bit copy
of its graph when the model folder has one (``quantization``), and
``onnxruntime-fp32`` the float graph.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path

import numpy as np

ENGINE_CHOICES = ("auto", "onnxruntime", "onnxruntime-fp32", "torch", "tensorrt")


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes: weights and graphs are identified by it."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass(frozen=True)
class ModelFiles:
    """A trained model on disk: PyTorch weights (the source of truth), the ONNX
    export, and ``model.json`` (version, architecture, preprocessing contract)."""

    directory: Path

    @classmethod
    def packaged(cls) -> "ModelFiles":
        return cls(Path(str(resources.files("cacflow.model") / "weights")))

    @classmethod
    def chosen(cls, directory: str | os.PathLike | None) -> "ModelFiles":
        """The config's ``model``: the shipped model when empty, else that folder's
        model, checked before any scan is read."""
        return cls.packaged() if not directory else cls(Path(directory)).checked()

    def checked(self, check_int8: bool = True) -> "ModelFiles":
        """Raise ValueError, saying what to fix, unless this folder holds a model this
        version of cacflow can run (its files, the input contract it was trained on, and
        an int8 copy, if any, that is of these weights: whichever engine runs, a folder
        whose files disagree is not scored)."""
        from cacflow.model.network import N_CLASSES
        from cacflow.model.preprocessing import INPUT_SETS, TARGET_SPACING_MM

        missing = [p.name for p in (self.directory / "model.json", self.torch_path, self.onnx_path) if not p.is_file()]
        if missing:
            raise ValueError(f"model folder {self.directory} lacks {', '.join(missing)}; point the config's `model` "
                             "at the output folder of `snakemake train` (results/model), or leave it empty for the "
                             "shipped model")
        info = self.info
        if self.input_set not in INPUT_SETS:
            raise ValueError(f"the model in {self.directory} was trained on the input set {self.input_set!r}, which "
                             f"this cacflow does not prepare (it knows {', '.join(INPUT_SETS)}); update cacflow")
        expected = {"in_channels": INPUT_SETS[self.input_set], "target_spacing_mm": TARGET_SPACING_MM,
                    "classes": N_CLASSES}
        found = {"in_channels": info.get("in_channels"), "target_spacing_mm": info.get("target_spacing_mm"),
                 "classes": len(info.get("classes", []))}
        if found != expected:
            raise ValueError(f"the model in {self.directory} was trained for inputs {found}, but this cacflow "
                             f"prepares {expected}; retrain it with this version (`snakemake train`)")
        problem = self.int8_problem() if check_int8 else None
        if problem:
            raise ValueError(problem)
        span = self.pixel_spacing_span
        if span is not None and not (isinstance(span, list) and len(span) == 2 and 0 < span[0] < span[1]):
            raise ValueError(f"model.json in {self.directory} has training_ranges.pixel_spacing_mm {span!r}; "
                             "it must be [lowest, highest] in mm, or absent")
        return self

    @property
    def torch_path(self) -> Path:
        return self.directory / "calciumnet.pt"

    @property
    def onnx_path(self) -> Path:
        return self.directory / "calciumnet.onnx"

    @property
    def int8_onnx_path(self) -> Path:
        """The graph's 8-bit copy (``quantization``): optional, older models lack it."""
        return self.directory / "calciumnet.int8.onnx"

    def int8_problem(self) -> str | None:
        """Why this folder's int8 copy must not run, or None (also when it has none): it
        must be the file model.json records, made from this folder's float graph, not
        one left from other weights (say, new weights copied over a trained folder)."""
        if not self.int8_onnx_path.is_file():
            return None
        record = self.info.get("int8") or {}
        if not record.get("sha256"):
            why = "model.json records no int8 copy"
        elif record["sha256"] != file_sha256(self.int8_onnx_path):
            why = "it is not the copy model.json records"
        elif record.get("float_onnx_sha256") != file_sha256(self.onnx_path):
            why = "it was made from another graph"
        else:
            return None
        return (f"{self.int8_onnx_path} is not the int8 copy of {self.onnx_path.name} in that folder ({why}); "
                "make it again with cacflow.training.refresh_int8, or delete it to run the float graph")

    @cached_property
    def info(self) -> dict:
        return json.loads((self.directory / "model.json").read_text())

    @property
    def version(self) -> str:
        return self.info["model_version"]

    @property
    def candidate_review(self):
        """The model's second look at small candidates: a patch review
        (``cacflow.patch_review``), a logistic one (``cacflow.candidate_review``), or
        None for a model fitted without one: the network then decides alone."""
        from cacflow.candidate_review import CandidateReview

        if "patch_review" in self.info:
            import torch

            from cacflow.patch_review import PatchNet, PatchReview
            from cacflow.tables import SCAN_TYPE_VALUES

            record = self.info["patch_review"]
            network = PatchNet(context=bool(record.get("context", False)))
            network.load_state_dict(torch.load(self.directory / record["weights"], map_location="cpu"))
            return PatchReview(network, float(record["min_share"]), float(record["max_area_mm2"]),
                               tuple(record.get("scan_types", SCAN_TYPE_VALUES)))
        record = self.info.get("candidate_review")
        return CandidateReview.from_dict(record) if record else None

    @property
    def input_set(self) -> str:
        """The channels the model was trained on (``cacflow.model.preprocessing.INPUT_SETS``;
        model.json ``input_set``, absent for the standard set)."""
        return self.info.get("input_set", "standard")

    @property
    def unsure_revote_shifts(self) -> tuple[tuple[float, float], ...]:
        """Grid shifts (rows, columns; fractions of a coarse cell) on which unsure
        candidates are voted again (``cacflow.revote``; model.json ``unsure_revote``),
        or () for a model that decides on the normal grid alone."""
        record = self.info.get("unsure_revote") or {}
        return tuple((float(row), float(col)) for row, col in record.get("grid_shifts", ()))

    @property
    def ensemble_size(self) -> int:
        """CalciumNets whose probabilities the model averages (1: a single network)."""
        return int(self.info.get("ensemble_size", 1))

    @property
    def pixel_spacing_span(self):
        """``training_ranges.pixel_spacing_mm`` of model.json: [lowest, highest] mm, or None."""
        return (self.info.get("training_ranges") or {}).get("pixel_spacing_mm")

    def within_training_range(self, spacing_mm) -> bool | None:
        """Whether a scan's in-plane pixel spacing (``spacing_mm[1:]``) lies inside the
        span the model was trained on (``training_ranges`` in model.json; None when the
        model records none). Outside it the model is extrapolating (model card). The
        span is one interval: the shipped model's gated (0.30-0.50 mm) and non-gated
        (0.60-0.85 mm) phantoms leave a gap at 0.50-0.60 mm that counts as inside (on
        generated gated scans there it agreed 97.5 % vs 100 %: model card)."""
        span = self.pixel_spacing_span
        if not span:
            return None
        low, high = span
        return all(low - 1e-6 <= float(s) <= high + 1e-6 for s in spacing_mm[1:])

    @cached_property
    def sha256(self) -> str:
        """Hash of everything that decides a call: provenance for every result row. The
        network's weights file, and with a candidate review or a re-vote also its record
        (and a review's weights), so that two models sharing a network but not the way
        they decide never share a hash."""
        parts = [self.network_sha256]
        for key in ("patch_review", "candidate_review", "unsure_revote"):
            record = self.info.get(key)
            if record:
                parts.append(json.dumps(record, sort_keys=True))
                if "weights" in record:
                    parts.append(file_sha256(self.directory / record["weights"]))
        return parts[0] if len(parts) == 1 else hashlib.sha256("\0".join(parts).encode()).hexdigest()

    @property
    def network_sha256(self) -> str:
        """Hash of the network's weights file alone (what a TensorRT engine is built from)."""
        return file_sha256(self.torch_path)

    def build_network(self):
        """The PyTorch network with the trained weights loaded (eval mode)."""
        import torch

        from cacflow.model.network import build_network

        network = build_network(self.info["in_channels"], tuple(self.info["widths"]), self.ensemble_size)
        network.load_state_dict(torch.load(self.torch_path, map_location="cpu", weights_only=True))
        return network.eval()


class Engine(abc.ABC):
    name = "base"
    device = "cpu"
    precision = "fp32"

    @property
    def label(self) -> str:
        """Recorded in every result row, e.g. ``onnxruntime-cpu-fp32``."""
        return f"{self.name}-{self.device}-{self.precision}"

    @abc.abstractmethod
    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """float32 [n, C, H, W] -> float32 logits [n, N_CLASSES, H, W]."""


class OnnxRuntimeEngine(Engine):
    """ONNX Runtime on the CPU: the model's int8 graph when asked for (``int8``, as the
    ``onnxruntime`` engine choice does) and present (the result rows then say
    ``onnxruntime-cpu-int8``), else the float one."""

    name = "onnxruntime"

    def __init__(self, model: ModelFiles, threads: int | None = None, int8: bool = False):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or _cpu_threads()
        options.inter_op_num_threads = 1
        graph = model.onnx_path
        if int8 and model.int8_onnx_path.is_file():
            problem = model.int8_problem()
            if problem:
                raise ValueError(problem)
            graph, self.precision = model.int8_onnx_path, "int8"
        self._session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        self._input_name = self._session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input_name: np.ascontiguousarray(batch, np.float32)})[0]


class TorchEngine(Engine):
    name = "torch"

    def __init__(self, model: ModelFiles, threads: int | None = None):
        import torch

        self._torch = torch
        self._network = model.build_network()
        if torch.cuda.is_available():
            self.device = "cuda"
            # fp16 autocast halves memory traffic on the GPU; bf16 where fp16 is not fast.
            self.precision = "fp16"
            self._network = self._network.to("cuda", memory_format=torch.channels_last)
        else:
            torch.set_num_threads(threads or _cpu_threads())

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            tensor = torch.from_numpy(np.ascontiguousarray(batch, np.float32))
            if self.device == "cuda":
                tensor = tensor.to("cuda", non_blocking=True).contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.float16):
                    logits = self._network(tensor)
                return logits.float().cpu().numpy()
            return self._network(tensor).numpy()


def tensorrt_available() -> tuple[bool, str]:
    """Whether the TensorRT engine can run here, and why not."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "the tensorrt package is not installed (pip install 'cacflow[tensorrt]')"
    try:
        import torch
    except ImportError:
        return False, "torch is needed for TensorRT buffers"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible"
    return True, "available"


def create_engine(kind: str = "auto", model: ModelFiles | None = None, threads: int | None = None) -> Engine:
    """Create the inference engine ``kind`` (see ENGINE_CHOICES)."""
    if kind not in ENGINE_CHOICES:
        raise ValueError(f"unknown engine {kind!r}; choose one of {', '.join(ENGINE_CHOICES)}")
    model = model or ModelFiles.packaged()
    if kind == "auto":
        if tensorrt_available()[0]:
            kind = "tensorrt"
        elif _cuda_available():
            kind = "torch"
        else:
            kind = "onnxruntime"
    if kind in ("onnxruntime", "onnxruntime-fp32"):
        return OnnxRuntimeEngine(model, threads, int8=kind == "onnxruntime")
    if kind == "torch":
        return TorchEngine(model, threads)
    ok, why = tensorrt_available()
    if not ok:
        raise RuntimeError(f"the tensorrt engine cannot run here: {why}")
    from cacflow.model.tensorrt_engine import TensorRTEngine

    return TensorRTEngine(model)


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _cpu_threads() -> int:
    """Threads this job may use: Snakemake/SLURM set the affinity mask."""
    env_threads = os.environ.get("CACFLOW_THREADS")
    if env_threads:
        return max(1, int(env_threads))
    return max(1, len(os.sched_getaffinity(0)))
