"""The int8 copy of the graph (cacflow.model.quantization), which the CPU engine runs:
it must give the float graph's labels, fit every x86 CPU's integer kernels, and be
reproducible from the weights."""

import hashlib
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from cacflow.inference import CalciumSegmenter
from cacflow.model.engines import ModelFiles, OnnxRuntimeEngine, create_engine
from cacflow.model.network import CalciumNet
from cacflow.model.preprocessing import N_INPUT_CHANNELS
from cacflow.model.quantization import quantize_model
from cacflow.synth.phantom import generate_phantom
from cacflow.training import TrainingConfig, export, randomised_phantom_settings, training_stream

SHIPPED = ModelFiles.packaged()
SMALL_NETWORK = (8, 8, 16, 16, 16)


def _int8_conv_weights(path):
    return [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer
            if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]


@pytest.mark.parametrize("seed", [4100, 4101, 4102])
def test_shipped_int8_copy_gives_the_float_graphs_labels_on_phantoms_it_was_not_calibrated_on(seed):
    """Seeds outside the training stream (calibration and the recorded parity use
    phantoms 0-11 of seed 20261126): the same label at every voxel. A candidate whose
    coronary share lies at an edge of the unsure band (0.1, 0.9) may cross it, so the
    unsure flips need only agree on almost every calcium voxel (on held-out cohort A,
    21 scans flagged for review against 23: docs/evaluation.md)."""
    rng = np.random.default_rng([seed, 0])
    phantom = generate_phantom(int(rng.integers(2**31)), randomised_phantom_settings(rng))
    int8 = CalciumSegmenter(create_engine("onnxruntime", SHIPPED, threads=2))
    fp32 = CalciumSegmenter(create_engine("onnxruntime-fp32", SHIPPED, threads=2))
    assert (int8.engine.label, fp32.engine.label) == ("onnxruntime-cpu-int8", "onnxruntime-cpu-fp32")
    by_int8, by_fp32 = (s.segment(phantom.hu, phantom.spacing_mm) for s in (int8, fp32))
    assert by_fp32.n_candidates > 0
    np.testing.assert_array_equal(by_int8.labels, by_fp32.labels)
    calcium = phantom.hu >= 130
    assert (by_int8.flipped_labels[calcium] == by_fp32.flipped_labels[calcium]).mean() > 0.999


def test_shipped_int8_weights_use_seven_bits_so_no_x86_kernel_overflows():
    """Without VNNI, x86 kernels add two u8 x s8 products in 16 bits: 255 * 64 * 2 fits
    in 32767, 255 * 127 * 2 does not. Every Conv is quantized."""
    weights = _int8_conv_weights(SHIPPED.int8_onnx_path)
    float_convs = [n for n in onnx.load(str(SHIPPED.onnx_path)).graph.node if n.op_type == "Conv"]
    assert len(weights) == len(float_convs) > 0
    assert max(int(np.abs(w.astype(np.int16)).max()) for w in weights) <= 64


def test_shipped_model_json_records_how_its_int8_copy_was_made_and_checked():
    record = SHIPPED.info["int8"]
    assert record["file"] == SHIPPED.int8_onnx_path.name
    assert record["sha256"] == hashlib.sha256(SHIPPED.int8_onnx_path.read_bytes()).hexdigest()
    # Calibrated on the phantoms of its last stage, the negatives tune (both kinds of blobs).
    assert record["calibration"] == {"seed": 20261126, "acquisition": "standard", "scattered_calcium": True,
                                     "perivascular_calcium": True, "phantoms": [0, 8]}
    assert record["parity_vs_float"]["same_class_share"] > 0.999
    assert record["parity_vs_float"]["calcium_pixels"] > 10000


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """An untrained small network exported by training's export with one calibration phantom."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("small")
    config = TrainingConfig(work_dir=str(directory), model_dir=str(directory), widths=SMALL_NETWORK,
                            int8_calibration_phantoms=1)
    export(CalciumNet(N_INPUT_CHANNELS, SMALL_NETWORK).eval(), config, history=[])
    return ModelFiles(directory)


@pytest.fixture(scope="module")
def small_model_calibration():
    """The network inputs ``small_model``'s export calibrated on (phantom 0 of its stream)."""
    from cacflow.model.quantization import phantom_inputs

    return phantom_inputs([0], training_stream(20261126))


def test_export_writes_the_int8_copy_and_model_json_records_it(small_model):
    record = small_model.info["int8"]
    assert small_model.int8_onnx_path.is_file()
    assert record["calibration"]["phantoms"] == [0, 1]
    assert 0 <= record["parity_vs_float"]["max_probability_diff"] <= 1
    assert "int8_calibration_phantoms" not in small_model.info["training"]
    assert not list(small_model.directory.glob("*.tmp")) and not list(small_model.directory.glob("tmp*"))


def test_quantizing_the_same_graph_on_the_same_phantoms_gives_the_same_file(small_model, small_model_calibration,
                                                                              tmp_path):
    quantize_model(small_model.onnx_path, tmp_path / "again.onnx", small_model_calibration)
    assert (tmp_path / "again.onnx").read_bytes() == small_model.int8_onnx_path.read_bytes()


def test_how_calibration_slices_are_batched_does_not_change_the_copy(small_model, small_model_calibration, tmp_path,
                                                                    monkeypatch):
    # Each activation's range is its min and max over all slices, and slices are computed
    # alone, so one slice per run must give the same file as the default batches (which
    # a 0.75 mm grid needs: 16-slice runs there overflowed 24 GB).
    import onnxruntime.quantization as ort_quantization

    from cacflow.model import quantization

    calibration = small_model_calibration
    assert len(calibration[0]) > quantization.CALIBRATION_BATCH_SLICES  # the default really batches
    run_sizes = []
    real_quantize_static = ort_quantization.quantize_static

    def quantize_static_seeing_runs(model_input, model_output, reader, **options):
        real_get_next = reader.get_next

        def get_next():
            batch = real_get_next()
            if batch is not None:
                run_sizes.append(len(batch["inputs"]))
            return batch

        reader.get_next = get_next
        return real_quantize_static(model_input, model_output, reader, **options)

    monkeypatch.setattr(ort_quantization, "quantize_static", quantize_static_seeing_runs)
    monkeypatch.setattr(quantization, "CALIBRATION_BATCH_SLICES", 1)
    quantize_model(small_model.onnx_path, tmp_path / "one_slice_runs.onnx", calibration)
    assert run_sizes and set(run_sizes) == {1}  # the calibrator really saw one slice per run
    assert (tmp_path / "one_slice_runs.onnx").read_bytes() == small_model.int8_onnx_path.read_bytes()


def test_cpu_engine_runs_the_int8_copy_unless_asked_for_fp32(small_model):
    batch = np.random.default_rng(2).normal(size=(3, N_INPUT_CHANNELS, 48, 64)).astype(np.float32)
    int8 = create_engine("onnxruntime", small_model, threads=1)
    fp32 = create_engine("onnxruntime-fp32", small_model, threads=1)
    assert (int8.label, fp32.label) == ("onnxruntime-cpu-int8", "onnxruntime-cpu-fp32")
    assert not np.array_equal(int8(batch), fp32(batch))  # really two graphs
    np.testing.assert_array_equal(fp32(batch), OnnxRuntimeEngine(small_model, threads=1, int8=False)(batch))


def test_without_calibration_phantoms_no_copy_is_written_and_a_stale_one_is_removed(small_model, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(small_model.directory, folder)
    config = TrainingConfig(work_dir=str(tmp_path), model_dir=str(folder), widths=SMALL_NETWORK,
                            int8_calibration_phantoms=0)
    export(ModelFiles(folder).build_network(), config, history=[])
    assert not (folder / "calciumnet.int8.onnx").exists()
    assert "int8" not in json.loads((folder / "model.json").read_text())
    assert create_engine("onnxruntime", ModelFiles(folder), threads=1).label == "onnxruntime-cpu-fp32"


def _copy(model: ModelFiles, folder):
    import shutil

    shutil.copytree(model.directory, folder)
    return ModelFiles(folder)


def test_an_old_int8_copy_beside_new_weights_is_refused_not_run(small_model, tmp_path):
    """A new model (weights, float graph, model.json) copied over a folder that still
    holds the old int8 copy: the CPU engine would score with the old weights while the
    rows name the new ones. The folder is refused (by ModelFiles.checked: the workflow,
    score-scan and evaluate stop before any scan), saying what to do."""
    torch.manual_seed(1)
    other = tmp_path / "other"
    export(CalciumNet(N_INPUT_CHANNELS, SMALL_NETWORK).eval(),
           TrainingConfig(work_dir=str(other), model_dir=str(other), widths=SMALL_NETWORK,
                          int8_calibration_phantoms=1), history=[])
    stale = _copy(small_model, tmp_path / "model")
    for name in ("calciumnet.pt", "calciumnet.onnx", "model.json"):
        (stale.directory / name).write_bytes((other / name).read_bytes())
    with pytest.raises(ValueError, match="not the copy model.json records.*refresh_int8"):
        ModelFiles(stale.directory).checked()
    with pytest.raises(ValueError, match="not the int8 copy"):
        create_engine("onnxruntime", ModelFiles(stale.directory), threads=1)


def test_a_new_float_graph_beside_the_old_copy_is_refused_and_refresh_onnx_mends_it(small_model, tmp_path):
    from cacflow.training import export_onnx, refresh_onnx

    folder = _copy(small_model, tmp_path / "model").directory
    torch.manual_seed(1)
    export_onnx(CalciumNet(N_INPUT_CHANNELS, SMALL_NETWORK).eval(), folder / "calciumnet.onnx")
    with pytest.raises(ValueError, match="made from another graph"):
        ModelFiles(folder).checked()
    refresh_onnx(folder, int8_calibration_phantoms=1)
    assert ModelFiles(folder).checked().int8_problem() is None


def test_an_int8_copy_model_json_does_not_record_is_refused(small_model, tmp_path):
    folder = _copy(small_model, tmp_path / "model").directory
    info = json.loads((folder / "model.json").read_text())
    del info["int8"]
    (folder / "model.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="model.json records no int8 copy"):
        ModelFiles(folder).checked()


def test_a_copy_that_fails_the_parity_check_is_not_kept(small_model, tmp_path, monkeypatch):
    """The rule itself, with a bar no copy can pass: the file is removed, model.json says
    why, and the CPU engine runs the float graph."""
    from cacflow.model import quantization

    folder = _copy(small_model, tmp_path / "model").directory
    monkeypatch.setattr(quantization, "MIN_SAME_CLASS_SHARE", 1.01)
    record = quantization.export_int8(folder, 1, stream=training_stream(20261126), n_parity=1)
    assert record["not_kept"] == "parity check failed" and record["file"] is None
    assert not (folder / "calciumnet.int8.onnx").exists()
    assert create_engine("onnxruntime", ModelFiles(folder), threads=1).label == "onnxruntime-cpu-fp32"


def test_the_shipped_int8_copy_is_of_the_shipped_float_graph():
    assert SHIPPED.int8_problem() is None
    assert SHIPPED.checked() is not None
