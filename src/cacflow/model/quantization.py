"""An 8-bit integer copy of a model's ONNX graph, for the CPU engine.

On 2 CPU cores the ensemble's convolutions are most of a gated scan's inference
time, and they are bound by arithmetic; ONNX Runtime runs them in 8-bit integers in
0.68-0.74x the time, which makes the inference step 0.78x (README, Performance).
``export_int8`` writes that copy, ``calciumnet.int8.onnx``, beside the float graph,
which stays the reference (the PyTorch, TensorRT and ``onnxruntime-fp32`` engines
use the float weights).

How it is quantized (ONNX Runtime static quantization, QDQ format):
* weights per output channel, activations per tensor, with ranges set by the minimum
  and maximum each activation takes on the network inputs of ``CALIBRATION_PHANTOMS``
  phantoms of the model's own training stream (no evaluation scan is seen). Fixed
  phantoms and a fixed method make the copy reproducible, byte for byte, within one
  environment; a copy made in another process may differ in the last bit of a few
  activation scales (docs/evaluation.md, "The int8 copy of the graph").
* weights in 7 bits (``reduce_range``): x86 CPUs without VNNI add pairs of 8-bit
  products in 16 bits, which full 8-bit weights can overflow; with 7 the sums always
  fit, so every x86 CPU computes the same integers.

``parity`` measures the copy against the float graph on the next ``PARITY_PHANTOMS``
phantoms of the stream, where it matters: the class probabilities of coarse pixels
holding calcium. A copy that changes the most probable class on more than
``1 - MIN_SAME_CLASS_SHARE`` of them is not kept (the CPU engine then runs the float
graph). The vote's labels on the validation phantoms and the held-out cohorts are
compared in docs/evaluation.md.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

CALIBRATION_PHANTOMS = 8  # phantoms 0-7 of the stream calibrate
PARITY_PHANTOMS = 4  # the next 4 check
# Slices per calibration run. Each activation's range is its minimum and maximum over
# every calibration slice (plain min/max, no moving average), and each slice is
# computed alone, so the ranges (and the copy, byte for byte) do not depend on how
# slices are batched. On a 0.75 mm grid (four times the cells of 1.5 mm) a 16-slice
# calibration run (the engine's batch) needed more than 24 GB; 4-slice runs fit.
CALIBRATION_BATCH_SLICES = 4
# The shipped copy keeps 99.999 %; a copy far below this is broken, not rounded.
MIN_SAME_CLASS_SHARE = 0.999

log = logging.getLogger(__name__)


def phantom_inputs(indices, stream: dict, input_set: str = "standard") -> list[np.ndarray]:
    """Network inputs [z, C, H, W] (channels of ``input_set``) of phantoms ``indices``
    of a training stream (``cacflow.training.training_stream``)."""
    from cacflow.model.preprocessing import network_inputs
    from cacflow.training import training_phantom

    volumes = []
    for index in indices:
        phantom = training_phantom(index=index, **stream)
        volumes.append(network_inputs(phantom.hu, phantom.spacing_mm, input_set=input_set)[0])
    return volumes


def quantize_model(float_path: Path, int8_path: Path, calibration: list[np.ndarray]) -> None:
    """Write the int8 copy of the ONNX graph ``float_path`` to ``int8_path`` (atomically)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from cacflow.atomic import atomic_write_bytes

    class Batches(CalibrationDataReader):
        def __init__(self):
            step = CALIBRATION_BATCH_SLICES
            self._batches = iter([{"inputs": volume[i : i + step]}
                                  for volume in calibration for i in range(0, len(volume), step)])

        def get_next(self):
            return next(self._batches, None)

    # Scratch files in the system's temporary folder, so that nothing is left in the
    # model folder if the process is killed; the result lands there atomically.
    with tempfile.TemporaryDirectory(prefix="cacflow-int8-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        # Folds constants and infers shapes, so that every Conv gets quantized; the
        # symbolic pass cannot size the dynamic height and width, the ONNX one can.
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        written = Path(scratch) / "int8.onnx"
        quantize_static(
            str(prepared), str(written), Batches(), quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
            reduce_range=True, op_types_to_quantize=["Conv"], calibrate_method=CalibrationMethod.MinMax,
        )
        atomic_write_bytes(int8_path, written.read_bytes())


def parity(float_path: Path, int8_path: Path, volumes: list[np.ndarray]) -> dict:
    """How far the int8 graph's class probabilities are from the float graph's, on
    coarse pixels holding calcium (input channel 4 > 0): the largest difference, and
    the share of those pixels whose most probable class is the same."""
    import onnxruntime as ort

    sessions = [ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]) for path in (float_path, int8_path)]
    largest, same, pixels = 0.0, 0, 0
    for volume in volumes:
        float_p, int8_p = (_probabilities(session, volume) for session in sessions)
        calcium = volume[:, 4] > 0
        float_p, int8_p = (p.transpose(0, 2, 3, 1)[calcium] for p in (float_p, int8_p))
        largest = max(largest, float(np.abs(float_p - int8_p).max(initial=0.0)))
        same += int((float_p.argmax(axis=1) == int8_p.argmax(axis=1)).sum())
        pixels += len(float_p)
    return {"max_probability_diff": round(largest, 6), "calcium_pixels": pixels,
            "same_class_share": same / pixels if pixels else 1.0}


def _probabilities(session, volume: np.ndarray) -> np.ndarray:
    from cacflow.inference import engine_logits, softmax

    return softmax(engine_logits(lambda batch: session.run(None, {"inputs": batch})[0], volume), axis=1)


def export_int8(model_dir: Path, n_calibration: int = CALIBRATION_PHANTOMS, *, stream: dict,
                n_parity: int = PARITY_PHANTOMS, input_set: str = "standard") -> dict:
    """Quantize ``model_dir``'s calciumnet.onnx into calciumnet.int8.onnx, calibrated
    and checked on phantoms of a training stream (``cacflow.training.training_stream``),
    and return what model.json records of it. A copy that fails the parity check is removed
    and the record says why."""
    from cacflow.model.engines import file_sha256
    from cacflow.model.preprocessing import input_set_record

    model_dir = Path(model_dir)
    float_path, int8_path = model_dir / "calciumnet.onnx", model_dir / "calciumnet.int8.onnx"
    quantize_model(float_path, int8_path, phantom_inputs(range(n_calibration), stream, input_set))
    check = parity(float_path, int8_path, phantom_inputs(range(n_calibration, n_calibration + n_parity), stream,
                                                         input_set))
    record = {
        "file": int8_path.name,
        "method": "ONNX Runtime static QDQ: Conv weights int8 per channel (7-bit range), "
                  "activations int8 per tensor, min/max calibration",
        "calibration": {**stream, **input_set_record(input_set), "phantoms": [0, n_calibration]},
        "parity_vs_float": {"phantoms": [n_calibration, n_calibration + n_parity], **check},
    }
    if check["same_class_share"] < MIN_SAME_CLASS_SHARE:
        int8_path.unlink()
        log.warning("int8 copy not kept: it changes the class of %.3f %% of calcium pixels (at most %.1f %% allowed); "
                    "the CPU engine will run the float graph", 100 * (1 - check["same_class_share"]),
                    100 * (1 - MIN_SAME_CLASS_SHARE))
        return {**record, "file": None, "not_kept": "parity check failed"}
    # Which files it is: an engine refuses a copy that is not this one of this float
    # graph (ModelFiles.int8_problem), e.g. an old copy left beside new weights.
    return {**record, "sha256": file_sha256(int8_path), "float_onnx_sha256": file_sha256(float_path)}
