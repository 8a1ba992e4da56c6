"""Every engine available here labels generated scans like the fp32 PyTorch
reference: the same vessel on >= 99.9 % of calcified voxels and each scan's
Agatston within 1 %."""

from __future__ import annotations

import pytest

from cacflow.inference import CalciumSegmenter
from cacflow.model.engines import ModelFiles, OnnxRuntimeEngine, TorchEngine, tensorrt_available
from cacflow.scoring import score_volume
from cacflow.synth.phantom import PhantomSettings, generate_phantom

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scans():
    settings = [
        PhantomSettings(rows=256, cols=256, pixel_spacing_mm=0.78, target_agatston=300.0),
        PhantomSettings(rows=256, cols=256, pixel_spacing_mm=0.78, gated=False, fov_centre="body",
                        slice_thickness_mm=5.0, slice_increment_mm=5.0, target_agatston=80.0),
        PhantomSettings(rows=320, cols=320, pixel_spacing_mm=0.5, n_coronary_lesions=6),
    ]
    return [generate_phantom(4100 + i, s) for i, s in enumerate(settings)]


@pytest.fixture(scope="module")
def reference(scans):
    """fp32 PyTorch on the CPU: the reference every engine is held to."""
    model = ModelFiles.packaged()
    engine = TorchEngine(model)
    if engine.device != "cpu":
        pytest.skip("the fp32 reference needs the CPU path of the torch engine")
    segmenter = CalciumSegmenter(engine)
    return [segmenter.segment(p.hu, p.spacing_mm).labels for p in scans]


def engines():
    model = ModelFiles.packaged()
    yield OnnxRuntimeEngine(model, int8=False)
    yield OnnxRuntimeEngine(model, int8=True)  # the shipped int8 copy, what the CPU runs by default
    available, why = tensorrt_available()
    if available:
        from cacflow.model.tensorrt_engine import TensorRTEngine

        yield TensorRTEngine(model)
    try:
        import torch

        if torch.cuda.is_available():
            yield TorchEngine(model)  # CUDA, fp16 autocast
    except ImportError:
        pass


def test_engines_agree_with_the_fp32_reference(scans, reference):
    checked = []
    for engine in engines():
        segmenter = CalciumSegmenter(engine)
        for phantom, expected in zip(scans, reference):
            labels = segmenter.segment(phantom.hu, phantom.spacing_mm).labels
            calcified = phantom.hu >= 130
            agreement = (labels[calcified] == expected[calcified]).mean()
            assert agreement >= 0.999, (engine.label, agreement)
            ours = score_volume(phantom.hu, labels, phantom.spacing_mm).agatston_total
            theirs = score_volume(phantom.hu, expected, phantom.spacing_mm).agatston_total
            assert abs(ours - theirs) <= 0.01 * max(theirs, 1e-9) or ours == theirs, (engine.label, ours, theirs)
        checked.append(engine.label)
    assert {"onnxruntime-cpu-fp32", "onnxruntime-cpu-int8"} <= set(checked)
