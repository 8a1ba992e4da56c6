"""Engines agree with the fp32 PyTorch network; choices and failures are explicit."""

import numpy as np
import pytest
import torch

from cacflow.model.engines import ModelFiles, OnnxRuntimeEngine, TorchEngine, create_engine, tensorrt_available
from cacflow.model.network import CalciumNet
from cacflow.model.preprocessing import N_INPUT_CHANNELS
from cacflow.training import TrainingConfig, export


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    """An untrained network exported like a trained one: parity does not need training."""
    torch.manual_seed(0)
    network = CalciumNet(N_INPUT_CHANNELS, (8, 8, 16, 16, 16)).eval()
    directory = tmp_path_factory.mktemp("model")
    # Without the int8 copy (test_quantization.py has it): these tests are about the float graph.
    config = TrainingConfig(work_dir=str(directory), model_dir=str(directory), widths=(8, 8, 16, 16, 16),
                            int8_calibration_phantoms=0)
    export(network, config, history=[])
    return ModelFiles(directory)


def test_export_records_parity_and_architecture(random_model):
    info = random_model.info
    assert info["onnx_max_abs_diff_vs_torch"] < 1e-3
    assert info["widths"] == [8, 8, 16, 16, 16]
    assert len(random_model.sha256) == 64


def test_onnxruntime_matches_torch_on_any_batch_and_size(random_model):
    batch = np.random.default_rng(1).normal(size=(5, N_INPUT_CHANNELS, 48, 80)).astype(np.float32)
    ort_logits = OnnxRuntimeEngine(random_model, threads=1)(batch)
    torch_logits = TorchEngine(random_model, threads=1)(batch)
    assert ort_logits.shape == (5, 5, 48, 80)
    np.testing.assert_allclose(ort_logits, torch_logits, atol=1e-3, rtol=1e-3)
    assert (ort_logits.argmax(1) == torch_logits.argmax(1)).mean() > 0.999


def test_auto_picks_onnxruntime_on_a_cpu_machine(random_model):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: auto would pick a GPU engine")
    engine = create_engine("auto", random_model)
    assert engine.label == "onnxruntime-cpu-fp32"
    assert create_engine("torch", random_model).label == "torch-cpu-fp32"


def test_unknown_engine_is_refused(random_model):
    with pytest.raises(ValueError, match="unknown engine"):
        create_engine("tensorflow", random_model)


def test_tensorrt_without_tensorrt_says_why(random_model):
    available, why = tensorrt_available()
    if available:
        pytest.skip("TensorRT is available here")
    with pytest.raises(RuntimeError, match="cannot run here"):
        create_engine("tensorrt", random_model)
    assert why


def test_the_config_model_is_the_shipped_one_when_empty_else_that_folder(random_model):
    assert ModelFiles.chosen("").directory == ModelFiles.packaged().directory
    assert ModelFiles.chosen(None).directory == ModelFiles.packaged().directory
    assert ModelFiles.chosen(str(random_model.directory)).sha256 == random_model.sha256


@pytest.mark.parametrize("lost", ["model.json", "calciumnet.pt", "calciumnet.onnx"])
def test_a_model_folder_missing_a_file_is_refused_naming_it(random_model, tmp_path, lost):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(random_model.directory, copy)
    (copy / lost).unlink()
    with pytest.raises(ValueError, match=f"lacks {lost}.*results/model"):
        ModelFiles.chosen(str(copy))


def test_a_model_trained_for_other_inputs_is_refused(random_model, tmp_path):
    import json
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(random_model.directory, copy)
    info = json.loads((copy / "model.json").read_text())
    info["target_spacing_mm"] = 1.0  # an older preprocessing contract
    (copy / "model.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="trained for inputs.*retrain"):
        ModelFiles.chosen(str(copy))


def test_a_scan_is_within_the_models_training_range_only_when_both_pixel_spacings_are(random_model, tmp_path):
    import json
    import shutil

    low, high = random_model.info["training_ranges"]["pixel_spacing_mm"]
    assert (low, high) == (0.30, 0.85)  # the phantoms' span (cacflow.training)
    assert random_model.within_training_range((3.0, 0.30, 0.30)) is True
    assert random_model.within_training_range((5.0, 0.85, 0.85)) is True
    assert random_model.within_training_range((3.0, 0.97, 0.97)) is False  # a 500 mm chest field of view
    assert random_model.within_training_range((3.0, 0.25, 0.25)) is False
    assert random_model.within_training_range((3.0, 0.5, 0.9)) is False  # one axis outside is enough
    copy = tmp_path / "model"
    shutil.copytree(random_model.directory, copy)
    info = json.loads((copy / "model.json").read_text())
    del info["training_ranges"]  # a model exported before ranges were recorded
    (copy / "model.json").write_text(json.dumps(info))
    assert ModelFiles(copy).within_training_range((3.0, 0.97, 0.97)) is None
    assert ModelFiles.packaged().info["training_ranges"] == random_model.info["training_ranges"]


def _onnx_ops(path) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_the_shipped_ensemble_graph_has_no_onnx_softmax_and_matches_its_weights():
    """ONNX Runtime's Softmax on the class axis of NCHW data cost 0.19 s of a gated
    scan's engine time; the shipped graph writes the softmax out (network._channel_softmax)
    and still computes what calciumnet.pt does."""
    model = ModelFiles.packaged()
    assert model.ensemble_size == 2
    assert "Softmax" not in _onnx_ops(model.onnx_path)
    batch = np.random.default_rng(3).normal(size=(2, N_INPUT_CHANNELS, 64, 96)).astype(np.float32)
    np.testing.assert_allclose(OnnxRuntimeEngine(model, threads=1)(batch), TorchEngine(model, threads=1)(batch),
                               atol=1e-4, rtol=1e-4)


def test_refresh_onnx_re_exports_the_graph_and_keeps_the_weights(tmp_path):
    """An ensemble exported with the old graph (torch's own softmax) is exported again
    from its unchanged weights, and model.json records the new parity check."""
    import json

    import torch.nn.functional as F

    from cacflow.model.network import CalciumEnsemble
    from cacflow.training import refresh_onnx

    torch.manual_seed(0)
    ensemble = CalciumEnsemble(N_INPUT_CHANNELS, (8, 8, 16, 16, 16), 2).eval()

    class OldGraph(CalciumEnsemble):
        def forward(self, x):
            probabilities = torch.stack([F.softmax(member(x), dim=1) for member in self.members]).mean(dim=0)
            return torch.log(probabilities.clamp_min(self.MIN_PROBABILITY))

    old = OldGraph(N_INPUT_CHANNELS, (8, 8, 16, 16, 16), 2).eval()
    old.load_state_dict(ensemble.state_dict())
    config = TrainingConfig(work_dir=str(tmp_path), model_dir=str(tmp_path), widths=(8, 8, 16, 16, 16),
                            int8_calibration_phantoms=0)
    export(old, config, history=[])
    weights_before = (tmp_path / "calciumnet.pt").read_bytes()
    assert "Softmax" in _onnx_ops(tmp_path / "calciumnet.onnx")
    info_before = json.loads((tmp_path / "model.json").read_text())

    max_error = refresh_onnx(tmp_path, int8_calibration_phantoms=0)

    assert "Softmax" not in _onnx_ops(tmp_path / "calciumnet.onnx")
    assert (tmp_path / "calciumnet.pt").read_bytes() == weights_before
    info = json.loads((tmp_path / "model.json").read_text())
    assert info["onnx_max_abs_diff_vs_torch"] == max_error < 1e-3
    assert {k: v for k, v in info.items() if k != "onnx_max_abs_diff_vs_torch"} == \
        {k: v for k, v in info_before.items() if k != "onnx_max_abs_diff_vs_torch"}
    model = ModelFiles(tmp_path)
    batch = np.random.default_rng(4).normal(size=(2, N_INPUT_CHANNELS, 48, 64)).astype(np.float32)
    np.testing.assert_allclose(OnnxRuntimeEngine(model, threads=1)(batch), TorchEngine(model, threads=1)(batch),
                               atol=1e-4, rtol=1e-4)
    assert not list(tmp_path.glob("*.tmp"))
