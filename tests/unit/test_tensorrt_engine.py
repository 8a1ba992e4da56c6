"""TensorRT engine logic that needs no GPU: cache keys, build-once locking, shape
profile, the fp16 ONNX export. The engine itself runs where TensorRT and a GPU are."""

import multiprocessing
import time

import numpy as np
import pytest
import torch

from cacflow.model.engines import ModelFiles, tensorrt_available
from cacflow.model.network import CalciumNet
from cacflow.model.preprocessing import N_INPUT_CHANNELS
from cacflow.model.tensorrt_engine import ShapeProfile, cached_build, engine_cache_key, export_fp16_onnx
from cacflow.training import TrainingConfig, export

BASE = dict(model_sha256="a" * 64, tensorrt_version="10.9.0", compute_capability=(9, 0),
            profile=ShapeProfile(), precision="fp16")


def test_every_key_part_changes_the_key():
    base = engine_cache_key(**BASE)
    assert engine_cache_key(**BASE) == base
    variants = [
        {"model_sha256": "b" * 64}, {"tensorrt_version": "11.0.0"}, {"compute_capability": (8, 0)},
        {"profile": ShapeProfile(max_shape=(64, 352, 352))}, {"precision": "bf16"},
    ]
    keys = {engine_cache_key(**{**BASE, **change}) for change in variants}
    assert base not in keys and len(keys) == len(variants)


def test_profile_admits_the_pipeline_shapes_and_refuses_others():
    profile = ShapeProfile()
    assert profile.admits((16, N_INPUT_CHANNELS, 144, 144))
    assert profile.admits((1, N_INPUT_CHANNELS, 16, 352))
    assert not profile.admits((33, N_INPUT_CHANNELS, 144, 144))
    assert not profile.admits((4, N_INPUT_CHANNELS, 368, 144))


def _build_in_process(cache_dir, key, counter_path):
    def slow_build():
        with open(counter_path, "a") as handle:
            handle.write("built\n")
        time.sleep(0.5)
        return b"engine-bytes"

    assert cached_build(cache_dir, key, slow_build) == b"engine-bytes"


def test_concurrent_jobs_build_the_engine_once(tmp_path):
    counter = tmp_path / "builds.txt"
    context = multiprocessing.get_context("fork")
    jobs = [context.Process(target=_build_in_process, args=(tmp_path / "cache", "k1", counter)) for _ in range(4)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=30)
        assert job.exitcode == 0
    assert counter.read_text().count("built") == 1
    assert (tmp_path / "cache" / "k1.engine").read_bytes() == b"engine-bytes"


def test_fp16_onnx_export_is_fp16_and_agrees_with_fp32(tmp_path):
    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    network = CalciumNet(N_INPUT_CHANNELS, (8, 8, 16, 16, 16)).eval()
    export(network, TrainingConfig(work_dir=str(tmp_path), model_dir=str(tmp_path), widths=(8, 8, 16, 16, 16),
                                   int8_calibration_phantoms=0), [])
    path = export_fp16_onnx(ModelFiles(tmp_path), tmp_path / "fp16.onnx")
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    batch = np.random.default_rng(0).normal(size=(2, N_INPUT_CHANNELS, 48, 64)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    fp16 = session.run(None, {"inputs": batch.astype(np.float16)})[0].astype(np.float32)
    with torch.inference_mode():
        fp32 = network(torch.from_numpy(batch)).numpy()
    assert (fp16.argmax(1) == fp32.argmax(1)).mean() > 0.99
    np.testing.assert_allclose(fp16, fp32, atol=0.05, rtol=0.05)


def test_tensorrt_engine_matches_torch_where_available(tmp_path):
    available, why = tensorrt_available()
    if not available:
        pytest.skip(f"TensorRT engine not testable here: {why}")
    from cacflow.model.engines import TorchEngine
    from cacflow.model.tensorrt_engine import TensorRTEngine

    model = ModelFiles.packaged()
    batch = np.random.default_rng(0).normal(size=(4, N_INPUT_CHANNELS, 144, 144)).astype(np.float32)
    trt_logits = TensorRTEngine(model, cache_dir=tmp_path)(batch)
    reference = TorchEngine(model)(batch)
    assert (trt_logits.argmax(1) == reference.argmax(1)).mean() > 0.999
