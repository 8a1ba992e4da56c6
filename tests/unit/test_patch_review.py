import numpy as np
import pytest
import torch
from scipy import ndimage

from cacflow.inference import IN_PLANE_8_CONNECTED, assign_candidates
from cacflow.model.preprocessing import CoarseGrid
from cacflow.patch_review import (
    CONTEXT_PIXELS,
    CONTEXT_SPACING_MM,
    PATCH_PIXELS,
    PATCH_SPACING_MM,
    PatchNet,
    PatchReview,
    candidate_patches,
    context_patches,
)

from test_inference import as_logits, one_hot_probabilities


def test_patch_is_centred_on_its_candidate_with_known_channel_values():
    # 0.3 mm pixels: the patch's 0.6 mm pixels take every second voxel.
    hu = np.full((3, 200, 200), 40.0, dtype=np.float32)
    hu[1, 99:101, 99:101] = 230.0  # a 2 x 2 speck centred at (99.5, 99.5)
    hu[0, 100, 100] = 90.0
    components, _ = ndimage.label(hu >= 130, structure=IN_PLANE_8_CONNECTED)
    grid = CoarseGrid.for_shape(200, 200, 0.3, 0.3)  # 40 cells of 1.5 mm
    # LAD only in coarse cell (20, 20): voxels 100-104 (0.3 mm voxels, 5 to a 1.5 mm cell)
    probabilities = one_hot_probabilities(grid, 3, {(1, 20, 20): 2})
    patches = candidate_patches(hu, components, np.array([1]), as_logits(probabilities), grid,
                                (2.5, 0.3, 0.3), noise_hu=20.0)
    assert patches.shape == (1, 8, PATCH_PIXELS, PATCH_PIXELS)
    centre = PATCH_PIXELS // 2  # patch pixel 32 sits 0.3 mm past the centre, on voxel 100
    assert patches[0, 5, centre, centre] == 1.0 and patches[0, 5].sum() == 1.0  # one sample inside the speck
    assert patches[0, 4, centre, centre] == pytest.approx((230 - 130) / 20 / 10)
    assert patches[0, 4, 0, 0] == pytest.approx((40 - 130) / 20 / 10)  # soft tissue, 4.5 noise SD below
    assert patches[0, 1, 0, 0] == pytest.approx((40 - 50) / 250)
    # Windows are sampled bilinearly: (100.5, 100.5) averages the speck's corner voxel and three of tissue.
    assert patches[0, 3, centre, centre] == pytest.approx((230 + 3 * 40) / 4 / 1000)
    # The coarse map: coronary only over cell (20, 20), 1.5 mm = 2.5 patch pixels wide.
    assert patches[0, 6, centre, centre] == pytest.approx(1.0, abs=1e-4)
    assert patches[0, 6, 0, 0] == pytest.approx(0.0, abs=1e-4)
    assert 4 <= (patches[0, 6] > 0.5).sum() <= 9
    assert patches[0, 7, 0, 0] == pytest.approx(np.log(20.0) / 4)
    assert PATCH_SPACING_MM == 0.6


def test_wide_view_shows_the_surroundings_smoothed_with_the_scan_edge_marked():
    # 0.75 mm voxels, so the view's 2.25 mm pixel is 3 voxels and smoothing is a 3 x 3 box.
    hu = np.full((1, 120, 120), 40.0, dtype=np.float32)  # soft tissue
    hu[0, :, :30] = -100.0  # fat in columns 0-29
    hu[0, 60, 60] = 400.0  # the candidate: one voxel
    components, _ = ndimage.label(hu >= 130, structure=IN_PLANE_8_CONNECTED)
    grid = CoarseGrid.for_shape(120, 120, 0.75, 0.75)  # 60 cells of 1.5 mm
    # Coronary only in cells 29-31 (voxels 58-63) of rows and columns.
    probabilities = one_hot_probabilities(grid, 1, {(0, r, c): 2 for r in range(29, 32) for c in range(29, 32)})
    view = context_patches(hu, components, np.array([1]), as_logits(probabilities), grid, (3.0, 0.75, 0.75))
    assert view.shape == (1, 3, CONTEXT_PIXELS, CONTEXT_PIXELS) and CONTEXT_SPACING_MM == 2.25
    # View pixel j sits at voxel 60 + (j - 31.5) * 3: pixel 31.5 is the candidate.
    row_of_tissue, col_of_tissue = 36, 36  # voxel 60 + 4.5 * 3 = 73.5: tissue all round
    assert view[0, 0, row_of_tissue, col_of_tissue] == pytest.approx((40 - 50) / 250)
    assert view[0, 1, row_of_tissue, col_of_tissue] == pytest.approx(40 / 1000)
    col_of_fat = 31 - 12  # (19 - 31.5) * 3 = -37.5 -> voxel 22.5: fat, its 3 x 3 box all fat
    assert view[0, 0, row_of_tissue, col_of_fat] == pytest.approx((-100 - 50) / 250)
    assert view[0, 1, row_of_tissue, col_of_fat] == pytest.approx(-100 / 1000)
    # Beyond the scan (voxel 60 - 31.5 * 3 < 0 at the first pixel): windows -1, coronary map 0.
    assert view[0, 0, 0, 0] == -1.0 and view[0, 1, 0, 0] == -1.0 and view[0, 2, 0, 0] == 0.0
    # The candidate's voxel is smoothed with its eight tissue neighbours (soft window clips at 300).
    centre = (view[0, 0, 31, 31] + view[0, 0, 32, 32] + view[0, 0, 31, 32] + view[0, 0, 32, 31]) / 4
    assert centre * 250 + 50 > 40 + 1  # brighter than tissue, though one voxel in nine
    # The coronary map is read at the nearest voxel: pixels 31 and 32 (voxels 58 and 62) only.
    assert view[0, 2, 31:33, 31:33] == pytest.approx(np.ones((2, 2)), abs=1e-4)
    assert (view[0, 2] > 0.5).sum() == 4 and view[0, 2, row_of_tissue, col_of_tissue] == pytest.approx(0.0, abs=1e-4)


def test_a_review_with_a_wide_view_reads_it_and_refuses_to_run_without():
    network = PatchNet(context=True)
    patches = np.zeros((2, 8, PATCH_PIXELS, PATCH_PIXELS), dtype=np.float32)
    scalars = np.zeros((2, 3), dtype=np.float32)
    views = np.zeros((2, 3, CONTEXT_PIXELS, CONTEXT_PIXELS), dtype=np.float32)
    views[1, 2] = 1.0
    review = PatchReview(network)
    probability = review.probability(patches, scalars, views)
    assert probability.shape == (2,) and probability[0] != probability[1]  # the view changes the verdict
    with pytest.raises(ValueError, match="wide view"):
        review.probability(patches, scalars)
    assert not PatchNet().has_context and network.has_context


def _constant_review(logit: float, context: bool = False, scan_types=("gated", "nongated")) -> PatchReview:
    network = PatchNet(context=context)
    with torch.no_grad():
        for parameter in network.head[-1].parameters():
            parameter.zero_()
        network.head[-1].bias.fill_(logit)
    return PatchReview(network, min_share=0.01, max_area_mm2=5.0, scan_types=scan_types)


@pytest.mark.parametrize("context", [False, True], ids=["patch", "patch-and-wide-view"])
def test_patch_review_decides_small_candidates_and_leaves_large_ones_to_the_network(context):
    hu = np.full((1, 16, 16), 40.0, dtype=np.float32)
    hu[0, 0, 0:2] = 300.0  # 0.5 mm^2
    hu[0, 8:16, 8:16] = 300.0  # 16 mm^2
    grid = CoarseGrid.for_shape(16, 16, 0.5, 0.5)
    lad_everywhere = one_hot_probabilities(grid, 1, {(0, r, c): 2 for r in range(6) for c in range(6)})
    labels, _, _, n_coronary, _ = assign_candidates(hu, as_logits(lad_everywhere), grid, 130.0,
                                                    review=_constant_review(-20.0, context), pixel_area_mm2=0.25,
                                                    spacing_mm=(3.0, 0.5, 0.5))
    assert n_coronary == 1 and labels[0, 0, 0] == 0 and labels[0, 12, 12] == 2
    labels, *_ = assign_candidates(hu, as_logits(lad_everywhere), grid, 130.0, review=_constant_review(20.0, context),
                                   pixel_area_mm2=0.25, spacing_mm=(3.0, 0.5, 0.5))
    assert labels[0, 0, 0] == 2


def test_a_review_for_gated_scans_leaves_non_gated_ones_to_the_network():
    # A 0.5 mm^2 speck the network calls LAD; a review sure it is not coronary.
    hu = np.full((1, 16, 16), 40.0, dtype=np.float32)
    hu[0, 0, 0:2] = 300.0
    grid = CoarseGrid.for_shape(16, 16, 0.5, 0.5)
    logits = as_logits(one_hot_probabilities(grid, 1, {(0, r, c): 2 for r in range(6) for c in range(6)}))
    gated_only = _constant_review(-20.0, scan_types=("gated",))

    def speck_label(scan_type, review=gated_only):
        labels, *_ = assign_candidates(hu, logits, grid, 130.0, review=review, pixel_area_mm2=0.25,
                                       spacing_mm=(3.0, 0.5, 0.5), scan_type=scan_type)
        return labels[0, 0, 0]

    assert speck_label("gated") == 0  # the review decides: not coronary
    assert speck_label("nongated") == 2  # the network's call stands
    assert speck_label("nongated", review=_constant_review(-20.0)) == 0  # a review for both decides here too
    assert speck_label(None, review=_constant_review(-20.0)) == 0
    with pytest.raises(ValueError, match="gated scans only"):
        speck_label(None)  # never guessed
    with pytest.raises(ValueError, match="scan types"):
        PatchReview(PatchNet(), scan_types=("gated", "cta"))
    assert PatchReview(PatchNet(), scan_types=["nongated", "gated"]).scan_types == ("gated", "nongated")


def test_patch_network_learns_a_pattern_it_can_see():
    """Every patch holds the same bright speck; only the coronary ones lie where the
    coarse map (channel 6) says coronary: a fit that works tells them apart on
    held-out phantoms."""
    from cacflow.review_training import fit_patch_network

    rng = np.random.default_rng(3)
    n = 280
    coronary = rng.random(n) < 0.4
    patches = rng.normal(0.0, 0.3, (n, 8, 72, 72)).astype(np.float32)
    patches[:, 4, 33:39, 33:39] += 1.5
    patches[coronary, 6, 24:48, 24:48] += 0.8
    scalars = np.zeros((n, 3), dtype=np.float32)
    network, record = fit_patch_network(patches, scalars, coronary, np.arange(n), epochs=6, batch=32)
    held_out = (np.arange(n) % 7) == 3
    review = PatchReview(network)
    probability = review.probability(patches[held_out][:, :, 4:68, 4:68].copy(), scalars[held_out])
    assert ((probability >= 0.5) == coronary[held_out]).mean() >= 0.95
    assert record["held_out_candidates"] == held_out.sum() and 0 <= record["epoch"] < 6


def test_patch_network_with_a_wide_view_learns_what_only_the_view_shows():
    """The fine patches of both classes are drawn alike; only the wide view tells them
    apart (a ring of fat, read in the soft-tissue window, around the coronary ones), so
    a fit that did not use the view would stay at chance."""
    from cacflow.review_training import fit_patch_network

    rng = np.random.default_rng(5)
    n = 280
    coronary = rng.random(n) < 0.4
    patches = rng.normal(0.0, 0.3, (n, 8, 72, 72)).astype(np.float32)
    patches[:, 4, 33:39, 33:39] += 1.5
    views = rng.normal(0.0, 0.3, (n, 3, 64, 64)).astype(np.float32)
    ring = np.zeros((64, 64), dtype=bool)
    ring[16:48, 16:48] = True
    ring[24:40, 24:40] = False
    views[np.ix_(coronary, [0], np.arange(64), np.arange(64))] -= 0.8 * ring
    scalars = np.zeros((n, 3), dtype=np.float32)
    network, record = fit_patch_network(patches, scalars, coronary, np.arange(n), epochs=6, batch=32, context=views)
    held_out = (np.arange(n) % 7) == 3
    assert network.has_context and record["context"]
    probability = PatchReview(network).probability(patches[held_out][:, :, 4:68, 4:68].copy(), scalars[held_out],
                                                   views[held_out])
    assert ((probability >= 0.5) == coronary[held_out]).mean() >= 0.95


def test_fit_patch_review_stores_a_review_the_model_loads_and_resumes(tmp_path):
    import shutil

    from cacflow.model.engines import ModelFiles
    from cacflow.review_training import fit_patch_review

    model_dir = tmp_path / "model"
    shutil.copytree(ModelFiles.packaged().directory, model_dir)
    work = tmp_path / "patches"
    fit_patch_review(model_dir, work, counts=(2, 1, 1), workers=1, epochs=1, context=True, scan_types=("gated",))
    record = ModelFiles(model_dir).info["patch_review"]
    assert record["fitted_on"]["candidates"] > record["fitted_on"]["coronary_candidates"] > 0
    review = ModelFiles(model_dir).candidate_review
    assert isinstance(review, PatchReview) and review.network.has_context and record["context"]
    assert record["scan_types"] == ["gated"] and review.scan_types == ("gated",)
    cut = sorted(work.glob("*.npz"))
    assert [p.name for p in cut] == ["61000001_0000.npz", "61000001_0001.npz", "61000002_0000.npz", "61000003_0000.npz"]
    before = {p: p.stat().st_mtime_ns for p in cut}
    fit_patch_review(model_dir, work, counts=(2, 1, 1), workers=1, epochs=1)
    assert {p: p.stat().st_mtime_ns for p in cut} == before  # patches already cut are not cut again
    assert not ModelFiles(model_dir).candidate_review.network.has_context
    assert ModelFiles(model_dir).candidate_review.scan_types == ("gated", "nongated")


@pytest.mark.parametrize("counts", ["240:120", "1:2:-1", "a:b:c", "1:2:3:4:5"])
def test_cli_refuses_patch_review_phantoms_that_are_not_three_counts(tmp_path, counts):
    from cacflow import cli

    with pytest.raises(SystemExit):
        cli.main(["train", "--work-dir", str(tmp_path), "--model-dir", str(tmp_path / "m"),
                  "--patch-review-phantoms", counts])


def test_the_model_hash_covers_its_patch_review(tmp_path):
    import json
    import shutil

    from cacflow.model.engines import ModelFiles, file_sha256

    model_dir = tmp_path / "model"
    shutil.copytree(ModelFiles.packaged().directory, model_dir)
    alone = ModelFiles(model_dir).sha256
    assert alone == file_sha256(model_dir / "calciumnet.pt")  # a model without a review: the weights file's hash
    torch.manual_seed(0)
    torch.save(PatchNet().state_dict(), model_dir / "patch_review.pt")
    info = json.loads((model_dir / "model.json").read_text())
    info["patch_review"] = {"weights": "patch_review.pt", "min_share": 0.01, "max_area_mm2": 5.0, "scan_types": ["gated"]}
    (model_dir / "model.json").write_text(json.dumps(info))
    with_review = ModelFiles(model_dir)
    assert with_review.sha256 != alone and with_review.network_sha256 == alone
    info["patch_review"]["scan_types"] = ["gated", "nongated"]  # the same weights deciding elsewhere
    (model_dir / "model.json").write_text(json.dumps(info))
    assert ModelFiles(model_dir).sha256 not in (alone, with_review.sha256)
    torch.save(PatchNet().state_dict(), model_dir / "patch_review.pt")  # other review weights
    assert len({ModelFiles(model_dir).sha256, with_review.sha256, alone}) == 3


@pytest.mark.parametrize("scan_types", ["cta", "gated,chest", ""])
def test_cli_refuses_unknown_patch_review_scan_types(tmp_path, scan_types):
    from cacflow import cli

    with pytest.raises(SystemExit):
        cli.main(["train", "--work-dir", str(tmp_path), "--model-dir", str(tmp_path / "m"),
                  "--patch-review-scan-types", scan_types])


def test_cli_reads_patch_review_scan_types(tmp_path):
    from cacflow.cli import build_parser

    def parsed(*extra):
        return build_parser().parse_args(["train", "--work-dir", str(tmp_path), "--model-dir", str(tmp_path / "m"),
                                         *extra]).patch_review_scan_types

    assert parsed() == ("gated", "nongated")
    assert parsed("--patch-review-scan-types", "gated") == ("gated",)
    assert parsed("--patch-review-scan-types", "nongated, gated") == ("gated", "nongated")


def test_fit_refuses_to_decide_shares_it_was_not_fitted_on(tmp_path):
    from cacflow.review_training import fit_patch_review

    with pytest.raises(ValueError, match="never saw"):
        fit_patch_review(tmp_path / "model", tmp_path / "work", counts=(1, 0, 0), min_share=0.001)


def test_the_fourth_stream_adds_unfamiliar_calcium_to_the_same_patients():
    """The patch review's fourth stream draws the phantoms of its seed with breast
    arteries, nodes, granulomas and cartilage added: the same patient and coronary
    plaques as without them, plus calcium of those kinds, none of it coronary."""
    from cacflow.review_training import PATCH_REVIEW_STREAMS
    from cacflow.synth.phantom import UNFAMILIAR_CALCIUM_KINDS
    from cacflow.training import training_phantom

    seed, options = PATCH_REVIEW_STREAMS[3]
    assert options == {"speck_lesions": True, "unfamiliar_calcium": True}
    assert seed not in {s for s, _ in PATCH_REVIEW_STREAMS[:3]}
    plain_options = {k: v for k, v in options.items() if k != "unfamiliar_calcium"}
    for index in range(2):
        with_kinds = training_phantom(seed, index, **options)
        without = training_phantom(seed, index, **plain_options)
        kinds = {d["kind"] for d in with_kinds.distractors} & set(UNFAMILIAR_CALCIUM_KINDS)
        assert kinds and not {d["kind"] for d in without.distractors} & set(UNFAMILIAR_CALCIUM_KINDS)
        np.testing.assert_array_equal(with_kinds.coronary_labels, without.coronary_labels)
        assert with_kinds.spacing_mm == without.spacing_mm
