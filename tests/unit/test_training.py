"""Training runs where it is asked to, and a run that is killed resumes to the very
weights an uninterrupted run reaches (the checkpoint carries model, optimiser,
schedule and both random generators)."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from cacflow import cli, training
from cacflow.model.preprocessing import SIZE_MULTIPLE
from cacflow.training import TrainingConfig, build_dataset, resolve_training_device

SMALL_NETWORK = (8, 8, 16, 16, 16)


def test_auto_trains_on_a_gpu_when_torch_sees_one():
    assert resolve_training_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_training_device("cpu") == "cpu"


def test_asking_for_a_gpu_where_there_is_none_fails_with_a_reason():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        resolve_training_device("cuda")


def test_an_unknown_device_is_refused():
    with pytest.raises(ValueError, match="unknown training device 'tpu'"):
        resolve_training_device("tpu")


def test_a_granted_gpu_torch_cannot_use_is_reported(monkeypatch, caplog):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with caplog.at_level("WARNING", logger="cacflow.training"):
        assert resolve_training_device("auto") == "cpu"
    assert "a GPU was granted (CUDA_VISIBLE_DEVICES=0) but torch" in caplog.text


@pytest.fixture(scope="module")
def two_phantom_dataset(tmp_path_factory):
    """Two generated training volumes, shared by the runs below (build_dataset skips
    volumes already on disk)."""
    work = tmp_path_factory.mktemp("dataset_work")
    build_dataset(TrainingConfig(work_dir=str(work), model_dir=str(work / "unused"), n_volumes=2, workers=1))
    return work / "dataset"


def _config(tmp_path, name, dataset):
    work = tmp_path / name
    work.mkdir()
    (work / "dataset").symlink_to(dataset, target_is_directory=True)
    return TrainingConfig(work_dir=str(work), model_dir=str(work / "model"), n_volumes=2, steps=6,
                          batch_size=2, widths=SMALL_NETWORK, checkpoint_every=1, workers=1, device="cpu",
                          int8_calibration_phantoms=0)


def _weights(config):
    return torch.load(f"{config.model_dir}/calciumnet.pt", map_location="cpu", weights_only=True)


@pytest.fixture
def one_torch_thread():
    """One thread: CPU kernels are then bit-reproducible from run to run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_killed_run_resumes_to_the_uninterrupted_weights(tmp_path, two_phantom_dataset, monkeypatch,
                                                             one_torch_thread):
    straight = _config(tmp_path, "straight", two_phantom_dataset)
    training.train(straight)

    killed = _config(tmp_path, "killed", two_phantom_dataset)
    real_batch, calls = training.CropSampler.batch, []

    def batch_then_die(self, size):
        calls.append(size)
        if len(calls) == 4:  # steps 1-3 done and checkpointed: the node dies in step 4
            raise KeyboardInterrupt("node killed")
        return real_batch(self, size)

    monkeypatch.setattr(training.CropSampler, "batch", batch_then_die)
    with pytest.raises(KeyboardInterrupt):
        training.train(killed)
    monkeypatch.setattr(training.CropSampler, "batch", real_batch)
    assert torch.load(f"{killed.work_dir}/checkpoint.pt", weights_only=False)["step"] == 3
    training.train(killed)

    expected, resumed = _weights(straight), _weights(killed)
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name
    # ...and training did move the weights: the comparison is not between two copies
    # of the initialisation.
    torch.manual_seed(straight.seed)
    from cacflow.model.network import CalciumNet
    from cacflow.model.preprocessing import N_INPUT_CHANNELS

    initial = CalciumNet(N_INPUT_CHANNELS, SMALL_NETWORK).state_dict()
    assert any(not torch.equal(initial[name], expected[name]) for name in expected if name.endswith("weight"))
    info = json.loads((tmp_path / "killed" / "model" / "model.json").read_text())
    assert info["training"]["notes"]["trained_on"] == "cpu"
    assert [h["step"] for h in info["loss_history"]] == list(range(1, 7))


def test_a_checkpoint_of_another_recipe_is_refused_not_resumed(tmp_path, two_phantom_dataset):
    """Fewer steps would pass the old weights off as the new recipe's; more, or another
    learning rate, would continue a schedule made for the old one."""
    config = _config(tmp_path, "run", two_phantom_dataset)
    training.train(config)
    for changed in (replace(config, steps=4), replace(config, steps=8), replace(config, learning_rate=1e-4),
                    replace(config, batch_size=3)):
        with pytest.raises(ValueError, match="checkpoint.pt belongs to another recipe"):
            training.train(changed)
    training.train(config)  # the same recipe: taken up again


def test_cli_refuses_an_unknown_device(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--work-dir", str(tmp_path), "--model-dir", str(tmp_path / "m"), "--device", "gpu0"])
    assert "invalid choice: 'gpu0'" in capsys.readouterr().err


def test_an_ensemble_is_its_members_trained_alone_then_averaged(tmp_path, two_phantom_dataset, monkeypatch,
                                                                 one_torch_thread):
    from pathlib import Path

    import numpy as np

    from cacflow.model.engines import ModelFiles, OnnxRuntimeEngine
    from cacflow.model.preprocessing import N_INPUT_CHANNELS

    alone = replace(_config(tmp_path, "alone", two_phantom_dataset), steps=3)
    training.train(alone)
    pair = replace(_config(tmp_path, "pair", two_phantom_dataset), members=((2, 3), (1, 4)))
    info = training.train(pair)
    assert info["ensemble_size"] == 2
    assert [(m["n_volumes"], m["steps"], len(m["loss_history"])) for m in info["members"]] == [(2, 3, 3), (1, 4, 4)]

    model = ModelFiles(Path(pair.model_dir))
    assert model.ensemble_size == 2
    network = model.build_network()
    # A member is what the same recipe trains alone (same seed, same phantoms).
    first_member = network.members[0].state_dict()
    for name, value in _weights(alone).items():
        assert torch.equal(first_member[name], value), name
    assert not torch.equal(network.members[1].state_dict()["head.weight"], first_member["head.weight"])

    # The ensemble's output is the mean of its members' class probabilities.
    members = [ModelFiles(Path(pair.work_dir) / f"member{k}" / "model").build_network() for k in (1, 2)]
    x = torch.randn(2, N_INPUT_CHANNELS, 32, 48)
    with torch.inference_mode():
        expected = torch.stack([torch.softmax(member(x), dim=1) for member in members]).mean(dim=0)
        got = torch.softmax(network(x), dim=1)
    assert torch.allclose(got, expected, atol=1e-5)
    onnx = torch.softmax(torch.from_numpy(OnnxRuntimeEngine(model, threads=1)(x.numpy())), dim=1)
    assert np.abs((onnx - expected).numpy()).max() < 1e-4

    # Rerun: both members are trained, so nothing is trained again...
    real_train_network = training._train_network
    monkeypatch.setattr(training, "_train_network", lambda *a: pytest.fail("a trained member was trained again"))
    assert training.train(pair)["members"] == info["members"]
    # ...unless the recipe changed: then the old member is not passed off as the new one.
    with pytest.raises(ValueError, match="member 2 .* was trained with .* not with seed 20261126, 2 phantoms and 4 steps"):
        training.train(replace(pair, members=((2, 3), (2, 4))))
    # A member killed before its model was written resumes from its own checkpoint
    # (here its last step: it is exported again without training; resuming mid-run is
    # test_a_killed_run_resumes_to_the_uninterrupted_weights).
    monkeypatch.setattr(training, "_train_network", real_train_network)
    member2 = Path(pair.work_dir) / "member2"
    for done in (member2 / "model").iterdir():
        done.unlink()
    steps_run = []
    real_batch = training.CropSampler.batch
    monkeypatch.setattr(training.CropSampler, "batch", lambda self, size: steps_run.append(1) or real_batch(self, size))
    training.train(pair)
    assert steps_run == []  # its checkpoint was at its last step: nothing left to run
    assert ModelFiles(Path(pair.model_dir)).build_network().state_dict().keys() == network.state_dict().keys()


def test_an_ensemble_cannot_start_from_weights(tmp_path, two_phantom_dataset):
    pair = replace(_config(tmp_path, "pair", two_phantom_dataset), members=((2, 3), (1, 4)), init_weights="any.pt")
    with pytest.raises(ValueError, match="an ensemble is trained from scratch"):
        training.train(pair)
    assert not (tmp_path / "pair" / "member1").exists()


@pytest.mark.parametrize("spec", ["800", "400:0", "a:b", "400:20000,", ""])
def test_cli_refuses_a_malformed_ensemble_recipe(tmp_path, capsys, spec):
    with pytest.raises(SystemExit):
        cli.main(["train", "--work-dir", str(tmp_path), "--model-dir", str(tmp_path / "m"), "--members", spec])
    assert "expected VOLUMES:STEPS pairs" in capsys.readouterr().err


def test_cli_batch_size_is_the_number_of_crops_each_step_trains_on(tmp_path, two_phantom_dataset):
    work = tmp_path / "work"
    work.mkdir()
    (work / "dataset").symlink_to(two_phantom_dataset, target_is_directory=True)
    assert cli.main(["train", "--work-dir", str(work), "--model-dir", str(tmp_path / "model"), "--members", "2:2",
                     "--batch-size", "3", "--device", "cpu", "--workers", "1", "--int8-calibration-phantoms", "0",
                     "--negatives-tune", "none"]) == 0  # without it, the shipped 400-phantom tune would run
    info = json.loads((tmp_path / "model" / "model.json").read_text())
    assert info["training"]["batch_size"] == 3
    assert "negatives_tune" not in info
    assert [entry["step"] for entry in info["loss_history"]] == [2]
    assert "int8" not in info and not (tmp_path / "model" / "calciumnet.int8.onnx").exists()


def test_training_refuses_to_start_a_dataset_the_disk_cannot_hold(tmp_path, monkeypatch, capsys):
    """Checked against the real free space of tmp_path's disk, with phantoms made
    too large for any disk: refused before the first phantom is written, with what
    it needs and what is free."""
    monkeypatch.setattr(training, "BYTES_PER_TRAINING_VOLUME", 2**60)
    assert cli.main(["train", "--work-dir", str(tmp_path / "work"), "--model-dir", str(tmp_path / "model"),
                     "--members", "2:2", "--negatives-tune", "none", "--device", "cpu"]) == 1
    error = capsys.readouterr().err
    assert "2 training volumes need about" in error and "GiB are free there" in error
    assert not list((tmp_path / "work" / "dataset").glob("*.npy")) and not (tmp_path / "model").exists()


def test_a_two_stage_training_checks_both_stages_phantoms_before_the_first(tmp_path, monkeypatch, capsys):
    """With each phantom a quarter of the real free space, the first stage's 2 would fit
    but with the tune's 3 they would not: refused before any phantom is written."""
    import shutil

    monkeypatch.setattr(training, "BYTES_PER_TRAINING_VOLUME", shutil.disk_usage(tmp_path).free // 4)
    assert cli.main(["train", "--work-dir", str(tmp_path / "work"), "--model-dir", str(tmp_path / "model"),
                     "--members", "2:2", "--negatives-tune", "3:4", "--device", "cpu"]) == 1
    assert "5 training volumes need about" in capsys.readouterr().err
    assert not list((tmp_path / "work").rglob("*.npy")) and not (tmp_path / "model").exists()


@pytest.mark.parametrize("count", ["-1", "some"])
def test_cli_refuses_a_negative_int8_calibration(tmp_path, capsys, count):
    with pytest.raises(SystemExit):
        cli.main(["train", "--work-dir", str(tmp_path), "--model-dir", str(tmp_path / "m"),
                  "--int8-calibration-phantoms", count])
    assert f"expected 0 or a positive integer, got {count!r}" in capsys.readouterr().err


@pytest.mark.parametrize("size", ["0", "-4", "eight"])
def test_cli_refuses_a_batch_size_that_is_not_a_positive_integer(tmp_path, capsys, size):
    with pytest.raises(SystemExit):
        cli.main(["train", "--work-dir", str(tmp_path), "--model-dir", str(tmp_path / "m"), "--batch-size", size])
    assert f"expected a positive integer, got {size!r}" in capsys.readouterr().err


def test_the_standard_recipe_draws_as_before_and_the_wide_one_changes_only_the_acquisition():
    import numpy as np

    wide_spacings = {True: [], False: []}
    wide_kvps = set()
    for index in range(300):
        before = training.randomised_phantom_settings(np.random.default_rng([7, index]))
        standard = training.training_phantom_settings(np.random.default_rng([7, index]), "standard")
        wide = training.training_phantom_settings(np.random.default_rng([7, index]), "wide")
        assert standard == before  # the shipped model's phantoms are unchanged
        assert replace(wide, pixel_spacing_mm=standard.pixel_spacing_mm, kvp=standard.kvp) == standard
        low, high = (training.WIDE_GATED_PIXEL_SPACING_MM if wide.gated
                     else training.WIDE_NONGATED_PIXEL_SPACING_MM)
        assert low <= wide.pixel_spacing_mm <= high
        wide_spacings[wide.gated].append(wide.pixel_spacing_mm)
        wide_kvps.add(wide.kvp)
    assert max(wide_spacings[False]) > 0.90 and max(wide_spacings[True]) > 0.55  # beyond the standard spans
    assert wide_kvps == {80, 100, 120, 140}
    with pytest.raises(ValueError, match="unknown acquisition recipe"):
        training.training_phantom_settings(np.random.default_rng(1), "narrow")


def test_phantoms_of_another_recipe_are_never_mixed_into_a_dataset(tmp_path, two_phantom_dataset):
    standard = _config(tmp_path, "standard", two_phantom_dataset)
    assert json.loads((two_phantom_dataset / "dataset.json").read_text()) == {"seed": standard.seed,
                                                                               "acquisition": "standard"}
    build_dataset(standard)  # the same recipe: the volumes on disk are used
    for other in (replace(standard, acquisition="wide"), replace(standard, seed=standard.seed + 1),
                  replace(standard, scattered_calcium=True)):
        with pytest.raises(ValueError, match="was generated with"):
            build_dataset(other)
    with pytest.raises(ValueError, match="unknown acquisition recipe"):  # refused before any folder is claimed
        replace(standard, acquisition="narrow", dataset_dir=str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("acquisition, span", [("standard", [0.30, 0.85]), ("wide", [0.30, 0.98])])
def test_model_json_records_the_pixel_spacing_its_recipe_trained_on(tmp_path, acquisition, span):
    from cacflow.model.engines import ModelFiles
    from cacflow.model.network import build_network
    from cacflow.model.preprocessing import N_INPUT_CHANNELS

    config = TrainingConfig(work_dir=str(tmp_path), model_dir=str(tmp_path / "model"), widths=SMALL_NETWORK,
                            acquisition=acquisition, int8_calibration_phantoms=0)
    training.export(build_network(N_INPUT_CHANNELS, SMALL_NETWORK).eval(), config, [])
    model = ModelFiles(tmp_path / "model")
    assert model.pixel_spacing_span == pytest.approx(span)
    assert model.within_training_range((3.0, 0.9, 0.9)) is (acquisition == "wide")


def _assert_the_recipe_names(tmp_path, option: str, alongside: tuple[str, ...] = ()) -> TrainingConfig:
    """A training phantom option (one of ``training.STREAM_OPTIONS``), on with those
    ``alongside``: the dataset record, the checkpoint recipe and the int8 copy's
    calibration stream (read back from model.json's record) name it, and the dataset
    record only when it is on. Returns the config."""
    switched_on = {name: True for name in (*alongside, option)}
    config = TrainingConfig(work_dir=str(tmp_path), model_dir=str(tmp_path / "model"), **switched_on)
    stream = {"seed": config.seed, "acquisition": "standard", **switched_on}
    assert training._dataset_recipe(config) == stream
    assert training._checkpoint_recipe(config) != training._checkpoint_recipe(replace(config, **{option: False}))
    assert training._last_stage_stream(asdict(config), None) == stream
    assert option not in training._dataset_recipe(replace(config, **{option: False}))
    return config


def test_scattered_calcium_is_part_of_the_recipe_and_reaches_the_phantoms(tmp_path):
    """``cacflow train --scattered-calcium``: the training phantoms are the standard ones
    plus the blobs, and the dataset records it (so it is never mixed with a plain one)."""
    plain = training.training_phantom(20261126, 3)
    scattered = training.training_phantom(20261126, 3, scattered_calcium=True)
    blobs = [d for d in scattered.distractors if d["kind"] == "scattered"]
    assert blobs and [d for d in scattered.distractors if d["kind"] != "scattered"] == plain.distractors
    assert (scattered.coronary_labels == plain.coronary_labels).all() and scattered.lesions == plain.lesions
    _assert_the_recipe_names(tmp_path, "scattered_calcium")


def test_perivascular_calcium_is_part_of_the_recipe_and_reaches_the_phantoms(tmp_path):
    """``cacflow train --perivascular-calcium``: the phantoms are those without it plus
    the blobs beside the great vessels; the dataset, the checkpoint recipe and the int8
    copy's calibration stream (read back from model.json's record) name it."""
    scattered = training.training_phantom(20261126, 1, scattered_calcium=True)
    both = training.training_phantom(20261126, 1, scattered_calcium=True, perivascular_calcium=True)
    assert any(d["kind"] == "perivascular" for d in both.distractors)
    assert [d for d in both.distractors if d["kind"] != "perivascular"] == scattered.distractors
    assert (both.coronary_labels == scattered.coronary_labels).all() and both.lesions == scattered.lesions
    _assert_the_recipe_names(tmp_path, "perivascular_calcium", alongside=("scattered_calcium",))


def test_speck_lesions_are_part_of_the_recipe_and_reach_the_phantoms(tmp_path):
    """``cacflow train --speck-lesions``: the phantoms are those without it plus the
    specks (more coronary lesions, the same distractors); the dataset, checkpoint and
    int8 calibration records name them, and only when asked for."""
    plain = training.training_phantom(20261126, 2, scattered_calcium=True)
    specks = training.training_phantom(20261126, 2, scattered_calcium=True, speck_lesions=True)
    assert specks.lesions[:len(plain.lesions)] == plain.lesions and len(specks.lesions) > len(plain.lesions)
    assert specks.distractors == plain.distractors
    config = _assert_the_recipe_names(tmp_path, "speck_lesions", alongside=("scattered_calcium",))
    assert training.training_record(config, ensemble=False)["speck_lesions"] is True
    assert "speck_lesions" not in training.training_record(replace(config, speck_lesions=False), ensemble=False)
    assert training.negatives_tune_record(training.NegativesTune(4, 5, speck_lesions=True))["speck_lesions"] is True
    assert "speck_lesions" not in training.negatives_tune_record(training.NegativesTune(4, 5))


@pytest.mark.parametrize("kind, index", [("scattered", 3), ("perivascular", 1)])
def test_scattered_and_perivascular_blobs_are_hard_negatives_wherever_they_lie(tmp_path, kind, index):
    """Their centre cells join the hard-negative pool (crops are centred there 30 % of
    the time), also those far from any artery."""
    from cacflow.model.preprocessing import IGNORE_INDEX, network_inputs, network_targets

    stream = training.training_stream(20261126, "standard", **{f"{kind}_calcium": True})
    training._build_one((index, stream, tmp_path))
    hard = {tuple(int(v) for v in cell) for cell in np.load(tmp_path / f"{index:05d}_hard_negatives.npy")}
    phantom = training.training_phantom(index=index, **stream)
    _, grid = network_inputs(phantom.hu, phantom.spacing_mm)
    targets = network_targets(phantom.hu, phantom.coronary_labels, grid)
    saved_index = np.cumsum((targets != IGNORE_INDEX).any(axis=(1, 2))) - 1  # slices without calcium are not saved
    checked = 0
    for blob in (d for d in phantom.distractors if d["kind"] == kind and d["agatston_if_scored"] > 0):
        z, row, col = (int(round(v)) for v in blob["centre_voxel_zyx"])
        cell_row, cell_col = int(grid.row_index[row]), int(grid.col_index[col])
        if phantom.hu[z, row, col] >= 130 and targets[z, cell_row, cell_col] == 0:  # calcified, not coronary
            assert (int(saved_index[z]), cell_row, cell_col) in hard
            checked += 1
    assert checked >= 2


@pytest.fixture(scope="module")
def two_scattered_phantom_dataset(tmp_path_factory):
    """The first two volumes of the training stream with scattered blobs (the
    negatives tune's dataset)."""
    work = tmp_path_factory.mktemp("scattered_work")
    build_dataset(TrainingConfig(work_dir=str(work), model_dir=str(work / "unused"), n_volumes=2, workers=1,
                                 scattered_calcium=True))
    return work / "dataset"


def test_the_negatives_tune_is_the_trained_ensemble_tuned_on_phantoms_with_blobs(
        tmp_path, two_phantom_dataset, two_scattered_phantom_dataset, monkeypatch, one_torch_thread):
    """Stage 2 of a two-stage recipe: the ensemble the members make, tuned as a whole
    on the scattered-blob stream. Its weights are what tuning that ensemble by hand
    (``--init-weights``, ``--scattered-calcium``) gives; model.json records both stages;
    the int8 copy is calibrated on the tune's phantoms; a rerun trains nothing again,
    and a changed tune recipe is refused rather than resumed."""
    from pathlib import Path

    calibrations = []  # (phantoms, scattered) of each int8 copy asked for
    monkeypatch.setattr(training, "_export_int8", lambda folder, n, stream, input_set="standard":
                        calibrations.append((n, bool(stream.get("scattered_calcium")))) or {})
    tune = training.NegativesTune(volumes=2, steps=3, learning_rate=1e-3)
    recipe = replace(_config(tmp_path, "two_stage", two_phantom_dataset), members=((2, 3), (1, 4)),
                     negatives_tune=tune, model_version="9.9.9", int8_calibration_phantoms=5)
    (tmp_path / "two_stage" / "negatives_tune").mkdir()
    (tmp_path / "two_stage" / "negatives_tune" / "dataset").symlink_to(two_scattered_phantom_dataset,
                                                                       target_is_directory=True)
    training.train(recipe)
    assert calibrations[-1] == (5, True) and all(n == 0 for n, _ in calibrations[:-1])  # the base has none

    base_weights = tmp_path / "two_stage" / "base_model" / "calciumnet.pt"
    by_hand = replace(_config(tmp_path, "by_hand", two_scattered_phantom_dataset), n_volumes=2, steps=3,
                      learning_rate=1e-3, scattered_calcium=True, init_weights=str(base_weights))
    training.train(by_hand)
    tuned, expected = _weights(recipe), _weights(by_hand)
    base = torch.load(base_weights, map_location="cpu", weights_only=True)
    assert tuned.keys() == expected.keys() == base.keys() and len({name.split(".")[1] for name in tuned}) == 2
    for name in tuned:
        assert torch.equal(tuned[name], expected[name]), name
    assert any(not torch.equal(tuned[name], base[name]) for name in tuned if name.endswith("weight"))

    info = json.loads((Path(recipe.model_dir) / "model.json").read_text())
    assert info["model_version"] == "9.9.9" and info["ensemble_size"] == 2
    assert info["training"]["members"] == [[2, 3], [1, 4]] and "negatives_tune" not in info["training"]
    assert [(m["n_volumes"], m["steps"], len(m["loss_history"])) for m in info["members"]] == [(2, 3, 3), (1, 4, 4)]
    block = info["negatives_tune"]
    assert {k: block[k] for k in ("volumes", "steps", "learning_rate")} == {"volumes": 2, "steps": 3,
                                                                           "learning_rate": 1e-3}
    assert block["phantoms"] == {"seed": recipe.seed, "acquisition": "standard", "scattered_calcium": True}
    assert block["base_weights_sha256"] == training.file_sha256(base_weights) and block["trained_on"] == "cpu"
    assert [h["step"] for h in block["loss_history"]] == [1, 2, 3] and info["loss_history"] == []

    calibrations.clear()
    training.refresh_int8(recipe.model_dir, 5)
    assert calibrations == [(5, True)]

    real_batch = training.CropSampler.batch
    monkeypatch.setattr(training.CropSampler, "batch", lambda *a: pytest.fail("a finished stage was trained again"))
    again = training.train(recipe)
    assert again["members"] == info["members"] and again["negatives_tune"] == block
    for changed in (replace(tune, steps=2), replace(tune, learning_rate=2e-3)):
        with pytest.raises(ValueError, match="negatives_tune/checkpoint.pt belongs to another recipe"):
            training.train(replace(recipe, negatives_tune=changed))
    # Blobs beside the great vessels make other phantoms: the tune's dataset refuses them.
    with pytest.raises(ValueError, match="was generated with"):
        training.train(replace(recipe, negatives_tune=replace(tune, perivascular_calcium=True)))

    # A single network as the first stage: its record is the one member's.
    monkeypatch.setattr(training.CropSampler, "batch", real_batch)
    single = replace(_config(tmp_path, "single", two_phantom_dataset), members=((2, 3),), negatives_tune=tune)
    (tmp_path / "single" / "negatives_tune").mkdir()
    (tmp_path / "single" / "negatives_tune" / "dataset").symlink_to(two_scattered_phantom_dataset,
                                                                    target_is_directory=True)
    training.train(single)
    info = json.loads((Path(single.model_dir) / "model.json").read_text())
    assert info["ensemble_size"] == 1 and "n_volumes" not in info["training"]
    assert [(m["n_volumes"], m["steps"], len(m["loss_history"])) for m in info["members"]] == [(2, 3, 3)]


def test_the_shipped_model_json_records_the_recipe_snakemake_train_runs():
    """``snakemake train`` / ``cacflow train`` with no recipe arguments train what the
    shipped model.json says it is: the members, then the negatives tune from their
    weights, in the two-stage form ``_train_then_tune`` writes."""
    from cacflow.model.engines import ModelFiles

    info = ModelFiles.packaged().info
    assert info["model_version"] == TrainingConfig.model_version
    default = TrainingConfig(work_dir="w", model_dir="m", members=training.SHIPPED_MEMBERS)
    written = json.loads(json.dumps(training.training_record(default, ensemble=True)))
    assert info["training"] == written  # the first stage's record, as export writes it
    assert info["training"]["members"] == [list(m) for m in training.SHIPPED_MEMBERS]
    assert [(m["n_volumes"], m["steps"]) for m in info["members"]] == list(training.SHIPPED_MEMBERS)
    tune = info["negatives_tune"]
    shipped_tune = training.negatives_tune_record(training.SHIPPED_NEGATIVES_TUNE)
    assert {k: tune[k] for k in shipped_tune} == shipped_tune
    assert "speck_lesions" not in tune and "speck_lesions" not in info["training"]  # recorded only when used
    assert tune["phantoms"] == training.training_stream(20261126, "standard", True, True)
    assert len(tune["loss_history"]) == tune["steps"] // 100 and info["ensemble_size"] == 2


def test_cli_trains_the_shipped_recipe_unless_told_otherwise(tmp_path, monkeypatch, capsys):
    recipes = []
    monkeypatch.setattr(training, "train", lambda config: recipes.append(config) or {"model_version": "x"})
    base = ["train", "--work-dir", str(tmp_path), "--model-dir", str(tmp_path / "m")]
    assert cli.main(base) == 0  # the shipped recipe: the members, then the tune with both kinds of blobs
    assert recipes[-1].members == training.SHIPPED_MEMBERS
    assert recipes[-1].negatives_tune == training.NegativesTune(400, 5000, 5e-4, perivascular_calcium=True)
    assert recipes[-1].negatives_tune == training.SHIPPED_NEGATIVES_TUNE
    assert cli.main(base + ["--negatives-tune", "shipped"]) == 0
    assert recipes[-1].negatives_tune == training.SHIPPED_NEGATIVES_TUNE
    assert cli.main(base + ["--negatives-tune", "800:9000"]) == 0
    assert recipes[-1].members == training.SHIPPED_MEMBERS
    assert recipes[-1].negatives_tune == training.NegativesTune(800, 9000, 5e-4)
    assert cli.main(base + ["--members", "2:2", "--negatives-tune", "3:4",
                            "--negatives-tune-learning-rate", "0.001"]) == 0
    assert recipes[-1].negatives_tune == training.NegativesTune(3, 4, 0.001)
    assert cli.main(base + ["--negatives-tune", "3:4", "--negatives-tune-perivascular"]) == 0
    assert recipes[-1].negatives_tune == training.NegativesTune(3, 4, 5e-4, perivascular_calcium=True)
    assert cli.main(base + ["--negatives-tune", "3:4", "--negatives-tune-specks"]) == 0
    assert recipes[-1].negatives_tune == training.NegativesTune(3, 4, 5e-4, speck_lesions=True)
    # The modifiers change a VOLUMES:STEPS tune only: with none or the shipped one they are refused.
    for tune, modifier in (("none", ["--negatives-tune-perivascular"]), ("shipped", ["--negatives-tune-perivascular"]),
                           ("shipped", ["--negatives-tune-learning-rate", "0.001"]),
                           ("none", ["--negatives-tune-specks"])):
        assert cli.main(base + ["--negatives-tune", tune, *modifier]) == 2
        assert "need --negatives-tune VOLUMES:STEPS" in capsys.readouterr().err
    assert cli.main(base + ["--negatives-tune", "none"]) == 0 and recipes[-1].negatives_tune is None
    with pytest.raises(SystemExit):
        cli.main(base + ["--negatives-tune", "800:9000,400:100"])
    assert "expected one VOLUMES:STEPS pair, shipped or none" in capsys.readouterr().err
    # A COCA fine-tune tunes on the annotated scans only: a phantom tune asked for with it is
    # refused, and the shipped one is not applied.
    for options in (["--negatives-tune", "3:4"], ["--negatives-tune", "shipped"], ["--negatives-tune-perivascular"]):
        assert cli.main(base + ["--coca-root", str(tmp_path), *options]) == 2
        assert "--negatives-tune options cannot be combined with --coca-root" in capsys.readouterr().err
    assert cli.main(base + ["--coca-root", str(tmp_path)]) == 0 and recipes[-1].negatives_tune is None
    for rate in ("0", "-1e-3", "fast"):
        with pytest.raises(SystemExit):
            cli.main(base + ["--negatives-tune", "3:4", f"--negatives-tune-learning-rate={rate}"])
        assert "expected a positive number" in capsys.readouterr().err


def test_cli_blob_flags_reach_the_training_recipe(tmp_path, monkeypatch):
    recipes = []
    monkeypatch.setattr(training, "train", lambda config: recipes.append(config) or {"model_version": "x"})
    base = ["train", "--work-dir", str(tmp_path), "--model-dir", str(tmp_path / "m")]
    assert cli.main(base) == 0
    assert (recipes[-1].scattered_calcium, recipes[-1].perivascular_calcium) == (False, False)
    assert cli.main(base + ["--perivascular-calcium"]) == 0
    assert (recipes[-1].scattered_calcium, recipes[-1].perivascular_calcium) == (False, True)
    assert cli.main(base + ["--scattered-calcium", "--perivascular-calcium"]) == 0
    assert (recipes[-1].scattered_calcium, recipes[-1].perivascular_calcium) == (True, True)
    assert not recipes[-1].speck_lesions
    assert cli.main(base + ["--speck-lesions"]) == 0 and recipes[-1].speck_lesions


def test_training_then_fits_the_candidate_review_and_scans_use_it(tmp_path, two_phantom_dataset):
    """``--review-phantoms 1:1``: after export, one phantom with specks and one without
    fit the review, recorded in model.json, and the model folder loads it."""
    from cacflow.candidate_review import FEATURES
    from cacflow.model.engines import ModelFiles

    work = tmp_path / "work"
    work.mkdir()
    (work / "dataset").symlink_to(two_phantom_dataset, target_is_directory=True)
    assert cli.main(["train", "--work-dir", str(work), "--model-dir", str(tmp_path / "model"), "--members", "2:2",
                     "--device", "cpu", "--workers", "1", "--int8-calibration-phantoms", "0",
                     "--negatives-tune", "none", "--review-phantoms", "1:1"]) == 0
    record = json.loads((tmp_path / "model" / "model.json").read_text())["candidate_review"]
    assert record["features"] == list(FEATURES)
    assert record["fitted_on"]["phantoms_with_specks"] == 1 and record["fitted_on"]["phantoms_without"] == 1
    assert record["fitted_on"]["candidates"] > 0
    review = ModelFiles(tmp_path / "model").candidate_review
    assert review is not None and len(review.weights) == len(FEATURES)


@pytest.mark.parametrize("counts", ["1", "1:-1", "a:b", "1:2:3"])
def test_cli_refuses_review_phantoms_that_are_not_two_counts(tmp_path, counts):
    with pytest.raises(SystemExit):
        cli.main(["train", "--work-dir", str(tmp_path), "--model-dir", str(tmp_path / "m"), "--review-phantoms", counts])


def test_widened_weights_compute_what_the_narrower_network_does():
    """Starting weights with fewer input channels get zeros for the new ones: before any
    step the widened network gives the narrower one's output, whatever the new channels hold."""
    from cacflow.model.network import build_network, first_layer_channels, widened_first_layers

    torch.manual_seed(0)
    narrow = build_network(6, SMALL_NETWORK, 2).eval()
    wide = build_network(10, SMALL_NETWORK, 2)
    wide.load_state_dict(widened_first_layers(narrow.state_dict(), wide.state_dict()))
    wide.eval()
    x = torch.randn(2, 10, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(wide(x), narrow(x[:, :6]), rtol=0, atol=1e-6)
        assert not torch.allclose(narrow(x[:, :6]), narrow(torch.randn(2, 6, 32, 32)))  # the output depends on x
    assert first_layer_channels(wide.state_dict()) == 10 and first_layer_channels(narrow.state_dict()) == 6
    with pytest.raises(ValueError, match="take 10 input channels, the network 6"):
        widened_first_layers(wide.state_dict(), narrow.state_dict())


def test_a_tune_onto_the_subcell_inputs_records_them_and_scores(tmp_path, two_phantom_dataset, one_torch_thread):
    from cacflow.inference import CalciumSegmenter
    from cacflow.model.engines import ModelFiles, create_engine
    from cacflow.model.preprocessing import INPUT_SETS

    base = _config(tmp_path, "base", two_phantom_dataset)
    training.train(base)
    standard = json.loads((tmp_path / "base" / "model" / "model.json").read_text())
    # The standard set is not named: model.json keeps the shipped model's form.
    assert "input_set" not in standard and "input_set" not in standard["training"] and standard["in_channels"] == 6

    # A dataset holds the network's inputs: one of the standard set is refused.
    with pytest.raises(ValueError, match="was generated with"):
        training.train(replace(_config(tmp_path, "shared", two_phantom_dataset), input_set="subcell"))

    work = tmp_path / "subcell"
    tuned = TrainingConfig(work_dir=str(work), model_dir=str(work / "model"), n_volumes=2, steps=2, batch_size=2,
                           widths=SMALL_NETWORK, checkpoint_every=1, workers=1, device="cpu",
                           int8_calibration_phantoms=1, input_set="subcell",
                           init_weights=str(tmp_path / "base" / "model" / "calciumnet.pt"))
    training.train(tuned)
    assert json.loads((work / "dataset" / "dataset.json").read_text())["input_set"] == "subcell"
    assert np.load(work / "dataset" / "00000_inputs.npy").shape[1] == INPUT_SETS["subcell"]
    info = json.loads((work / "model" / "model.json").read_text())
    assert info["in_channels"] == 10 and info["input_set"] == "subcell" and info["training"]["input_set"] == "subcell"
    assert info["int8"]["calibration"]["input_set"] == "subcell"

    model = ModelFiles(work / "model").checked(check_int8=False)
    assert model.input_set == "subcell"
    segmenter = CalciumSegmenter.for_model(create_engine("onnxruntime-fp32", model, threads=1), model)
    hu = np.random.default_rng(0).normal(40, 30, (4, 64, 64)).astype(np.float32)
    hu[2, 30:33, 30:33] = 400.0
    assert segmenter.segment(hu, (3.0, 0.5, 0.5)).n_candidates >= 1
    # A model folder claiming an input set this cacflow does not prepare is refused.
    (work / "model" / "model.json").write_text(json.dumps(dict(info, input_set="octants")))
    with pytest.raises(ValueError, match="input set 'octants'"):
        ModelFiles(work / "model").checked()


def test_cli_passes_the_input_set(tmp_path, monkeypatch, capsys):
    recipes = []
    monkeypatch.setattr(training, "train", lambda config: recipes.append(config) or {"model_version": "x"})
    base = ["train", "--work-dir", str(tmp_path), "--model-dir", str(tmp_path / "m")]
    assert cli.main(base) == 0 and recipes[-1].input_set == "standard"
    assert cli.main(base + ["--input-set", "subcell"]) == 0 and recipes[-1].input_set == "subcell"
    with pytest.raises(SystemExit):
        cli.main(base + ["--input-set", "fine"])
    assert "invalid choice: 'fine'" in capsys.readouterr().err


def test_artery_outputs_leave_the_calcium_output_as_it_was_and_are_dropped_for_export():
    """A network given artery-map outputs on trained weights computes, before any step,
    exactly their calcium output; without the outputs its weights are a plain network's."""
    from cacflow.model.network import build_network, with_fresh_artery_heads, without_artery_heads

    for members in (1, 2):
        torch.manual_seed(0)
        plain = build_network(6, SMALL_NETWORK, members).eval()
        learning = build_network(6, SMALL_NETWORK, members, artery_head=True)
        target = learning.state_dict()
        learning.load_state_dict(with_fresh_artery_heads(plain.state_dict(), target))
        learning.eval()
        x = torch.randn(2, 6, 32, 32)
        with torch.inference_mode():
            calcium, arteries = learning.forward_with_arteries(x)
            torch.testing.assert_close(calcium, plain(x), rtol=0, atol=0)
            torch.testing.assert_close(learning(x), plain(x), rtol=0, atol=0)
        assert arteries.shape == calcium.shape == (2, 5, 32, 32)
        head_keys = {name for name in target if "artery_head" in name}
        assert len(head_keys) == 2 * members  # weight and bias of each member's
        exported = without_artery_heads(learning).state_dict()
        assert not any("artery_head" in name for name in exported)
        build_network(6, SMALL_NETWORK, members).load_state_dict(exported)  # strict: nothing missing or extra


def test_artery_targets_mark_the_artery_covering_a_quarter_of_a_pixel_or_more():
    """Hand-built labels at 0.5 mm pixels, so each 1.5 mm pixel holds 3 x 3 of them."""
    from cacflow.model.preprocessing import IGNORE_INDEX, CoarseGrid, artery_targets

    labels = np.zeros((1, 12, 12), np.uint8)
    labels[0, 0:3, 0] = 2  # 3 of 9 (33 %): LAD
    labels[0, 0:2, 3] = 1  # 2 of 9 (22 %): under a quarter, background
    labels[0, 3:6, 0:2] = 4  # 6 of 9 RCA beside 3 of 9 LCX: the larger share wins
    labels[0, 3:6, 2] = 3
    grid = CoarseGrid.for_shape(12, 12, 0.5, 0.5)
    targets = artery_targets(labels, grid)
    assert targets.shape == (1, grid.padded_height, grid.padded_width) == (1, 16, 16)
    assert targets[0, 0, 0] == 2 and targets[0, 0, 1] == 0 and targets[0, 1, 0] == 4
    assert (targets[0, :4, :4] > 0).sum() == 2
    assert (targets[0, 4:, :] == IGNORE_INDEX).all() and (targets[0, :, 4:] == IGNORE_INDEX).all()


def test_the_artery_map_is_learned_from_the_phantoms_tubes_and_not_exported(tmp_path, one_torch_thread):
    """The dataset holds each kept slice's artery map, drawn from the phantom's artery
    tubes; crops carry it aligned with their inputs and the same draws as without it; the
    exported model is a plain network whose record names the weight."""
    from cacflow.model.engines import ModelFiles
    from cacflow.model.preprocessing import IGNORE_INDEX, artery_targets, network_inputs, network_targets

    work = tmp_path / "arteries"
    config = TrainingConfig(work_dir=str(work), model_dir=str(work / "model"), n_volumes=1, steps=3, batch_size=2,
                            widths=SMALL_NETWORK, checkpoint_every=1, workers=1, device="cpu",
                            int8_calibration_phantoms=0, artery_loss_weight=0.1)
    info = training.train(config)
    data = work / "dataset"
    assert json.loads((data / "dataset.json").read_text())["artery_targets"] is True
    phantom = training.training_phantom(config.seed, 0)
    _, grid = network_inputs(phantom.hu, phantom.spacing_mm)
    # The kept slices (those with calcium) hold the phantom's maps, slice for slice.
    kept = (network_targets(phantom.hu, phantom.coronary_labels, grid) != IGNORE_INDEX).any(axis=(1, 2))
    kept_targets, kept_maps = np.load(data / "00000_targets.npy"), np.load(data / "00000_arteries.npy")
    coronary = kept_targets > 0
    anatomy = artery_targets(training.artery_labels(phantom), grid)[kept]
    tube = artery_targets(phantom.vessel_labels, grid)[kept]
    # The map is the arteries' tubes, with the plaques that bulge past them, and every
    # pixel whose calcium target names an artery.
    np.testing.assert_array_equal(kept_maps[~coronary], anatomy[~coronary])
    assert coronary.sum() >= 20 and (kept_maps[coronary] == kept_targets[coronary]).all()
    assert ((anatomy > 0) & (tube == 0)).any() and (anatomy[tube > 0] == tube[tube > 0]).all()
    assert (tube > 0).sum() > 2 * coronary.sum()  # mostly artery without calcium

    with_maps = training.CropSampler(data, 1, 32, np.random.default_rng(5), arteries=True).batch(12)
    without = training.CropSampler(data, 1, 32, np.random.default_rng(5)).batch(12)
    assert len(with_maps) == 3 and len(without) == 2
    np.testing.assert_array_equal(with_maps[0], without[0])
    np.testing.assert_array_equal(with_maps[1], without[1])
    # Each crop's map is cut from the same window as its calcium target.
    coronary = with_maps[1] > 0
    assert coronary.any() and (with_maps[2][coronary] == with_maps[1][coronary]).mean() > 0.9

    assert info["training"]["artery_loss_weight"] == 0.1
    weights = torch.load(work / "model" / "calciumnet.pt", map_location="cpu", weights_only=True)
    assert not any("artery_head" in name for name in weights)
    ModelFiles(work / "model").checked(check_int8=False)
    # A checkpoint without the artery map is another recipe, not resumed under it.
    with pytest.raises(ValueError, match="another recipe|was generated with"):
        training.train(replace(config, artery_loss_weight=0.0, steps=4))


def test_an_artery_map_is_refused_for_coca_and_below_zero(tmp_path):
    with pytest.raises(ValueError, match="phantoms only"):
        TrainingConfig(work_dir=str(tmp_path), model_dir=str(tmp_path / "m"), coca_root=str(tmp_path),
                       artery_loss_weight=0.1)
    with pytest.raises(ValueError, match="0 or more"):
        TrainingConfig(work_dir=str(tmp_path), model_dir=str(tmp_path / "m"), artery_loss_weight=-1.0)


def test_a_network_the_engines_cannot_pad_for_is_refused_before_training(tmp_path):
    # Five poolings need sizes in multiples of 32; the engines pad to 16 (SIZE_MULTIPLE),
    # so such a run would only fail at export, after its training.
    assert SIZE_MULTIPLE == 16
    folders = {"work_dir": str(tmp_path), "model_dir": str(tmp_path / "m")}
    with pytest.raises(ValueError, match="multiples of 32"):
        TrainingConfig(**folders, widths=(16, 24, 32, 48, 64, 96))
    with pytest.raises(ValueError, match=r"crop \(100\)"):
        TrainingConfig(**folders, crop=100)
    assert TrainingConfig(**folders, widths=(8, 16, 32), crop=100).crop == 100  # two poolings: multiples of 4


def test_cli_passes_the_artery_loss_weight(tmp_path, monkeypatch):
    recipes = []
    monkeypatch.setattr(training, "train", lambda config: recipes.append(config) or {"model_version": "x"})
    base = ["train", "--work-dir", str(tmp_path), "--model-dir", str(tmp_path / "m")]
    assert cli.main(base) == 0 and recipes[-1].artery_loss_weight == 0.0
    assert cli.main(base + ["--artery-loss-weight", "0.1"]) == 0 and recipes[-1].artery_loss_weight == 0.1
