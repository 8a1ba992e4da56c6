import math

import numpy as np
import pytest
from scipy import ndimage

from cacflow.candidate_review import FEATURES, CandidateReview, candidate_features, fit_logistic, scan_noise_hu
from cacflow.inference import IN_PLANE_8_CONNECTED, assign_candidates
from cacflow.model.preprocessing import CoarseGrid

from test_inference import as_logits, one_hot_probabilities


def test_noise_estimate_finds_the_standard_deviation_of_white_noise_on_soft_tissue():
    rng = np.random.default_rng(0)
    hu = 40.0 + rng.normal(0.0, 20.0, (16, 128, 128)).astype(np.float32)
    hu[:, :, :10] = -1000.0  # air and bone are left out, not counted as noise
    hu[:, :, 10:20] = 700.0
    assert scan_noise_hu(hu) == pytest.approx(20.0, rel=0.05)


def test_noise_estimate_has_a_floor_for_a_noise_free_scan():
    assert scan_noise_hu(np.full((4, 32, 32), 40.0, dtype=np.float32)) == 5.0


def test_features_of_a_hand_built_candidate():
    hu = np.full((3, 10, 10), 40.0, dtype=np.float32)
    hu[1, 4:6, 4:6] = [[200.0, 160.0], [160.0, 160.0]]  # the candidate: 4 pixels, peak 200, mean 170
    hu[0, 3, 3] = 100.0  # in the ring of the slice below (grown by one pixel): counts as adjacent
    hu[2, 0, 0] = 900.0  # far away in the slice above: does not
    components, _ = ndimage.label(hu >= 130, structure=IN_PLANE_8_CONNECTED)
    share = np.array([0.0, 0.2])
    features = candidate_features(hu, components, np.array([1]), share, pixel_area_mm2=0.25, noise_hu=10.0)
    expected = {
        "logit_share": math.log(0.2 / 0.8),
        "log_area_mm2": math.log(1.0),
        "peak_over_noise": (200 - 130) / 10,
        "adjacent_over_noise": (100 - 40) / 10,  # brightest neighbour over the ring's mean
        "mean_over_noise": (170 - 130) / 10,
        "log_noise_hu": math.log(10.0),
        "ring_over_noise": 40 / 10,
    }
    assert dict(zip(FEATURES, features[0])) == pytest.approx(expected)


def test_logistic_fit_recovers_a_known_model():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20000, len(FEATURES)))
    true_weights = np.array([1.5, -1.0, 0.5, 0.0, 0.0, 2.0, 0.0])
    y = rng.random(len(x)) < 1 / (1 + np.exp(-(0.3 + x @ true_weights)))
    review = fit_logistic(x, y)
    # features are standardised inside: map back to the raw scale to compare
    raw_weights = np.array(review.weights) / np.array(review.feature_scale)
    assert raw_weights == pytest.approx(true_weights, abs=0.08)
    probe = rng.normal(size=(5, len(FEATURES)))
    assert review.probability(probe) == pytest.approx(1 / (1 + np.exp(-(0.3 + probe @ true_weights))), abs=0.03)


def test_record_round_trips_and_refuses_other_features():
    review = CandidateReview(0.5, (1.0,) * 7, (0.0,) * 7, (1.0,) * 7, 0.02, 8.0)
    assert CandidateReview.from_dict(review.to_dict()) == review
    record = review.to_dict() | {"features": ["logit_share"]}
    with pytest.raises(ValueError, match="refit"):
        CandidateReview.from_dict(record)


def _two_candidates():
    """A 2-pixel candidate in coarse cell (0, 0) and a 64-pixel one (16 mm^2) in cell (2, 2)."""
    hu = np.full((1, 16, 16), 40.0, dtype=np.float32)
    hu[0, 0, 0:2] = 300.0
    hu[0, 8:16, 8:16] = 300.0
    grid = CoarseGrid.for_shape(16, 16, 0.5, 0.5)  # 1.5 mm cells: 3x3 pixels each
    return hu, grid


def test_review_decides_small_candidates_and_leaves_large_ones_to_the_network():
    hu, grid = _two_candidates()
    network_says_lad_everywhere = one_hot_probabilities(grid, 1, {(0, r, c): 2 for r in range(6) for c in range(6)})
    never = CandidateReview(-20.0, (0.0,) * 7, (0.0,) * 7, (1.0,) * 7, min_share=0.01, max_area_mm2=10.0)
    labels, _, n_candidates, n_coronary, _ = assign_candidates(
        hu, as_logits(network_says_lad_everywhere), grid, 130.0, review=never, pixel_area_mm2=0.25)
    assert n_candidates == 2 and n_coronary == 1
    assert labels[0, 0, 0] == 0  # 0.5 mm^2: the review's "no" wins over the network
    assert labels[0, 12, 12] == 2  # 16 mm^2: beyond max_area_mm2, the network's LAD stands

    network_says_noise = one_hot_probabilities(grid, 1, {})
    network_says_noise[0, 0, 0, 0], network_says_noise[0, 2, 0, 0] = 0.9, 0.1  # a 10 % LAD share in cell (0, 0)
    always = CandidateReview(20.0, (0.0,) * 7, (0.0,) * 7, (1.0,) * 7, min_share=0.01, max_area_mm2=10.0)
    labels, _, _, n_coronary, _ = assign_candidates(
        hu, as_logits(network_says_noise), grid, 130.0, review=always, pixel_area_mm2=0.25)
    assert n_coronary == 1 and labels[0, 0, 0] == 2  # the review's "yes", in the network's likeliest vessel
    assert labels[0, 12, 12] == 0


def test_review_skips_candidates_the_network_rules_out():
    hu, grid = _two_candidates()
    always = CandidateReview(20.0, (0.0,) * 7, (0.0,) * 7, (1.0,) * 7, min_share=0.01, max_area_mm2=10.0)
    labels, *_ = assign_candidates(hu, as_logits(one_hot_probabilities(grid, 1, {})), grid, 130.0,
                                   review=always, pixel_area_mm2=0.25)
    assert labels.max() == 0  # share ~0 < min_share: not reviewed, stays "not coronary"


def test_the_shipped_model_has_no_review_and_decides_by_the_network_alone():
    """The review was tried and not adopted (docs/evaluation.md): the shipped model.json
    holds no review, so the workflow's decisions are the network's."""
    from cacflow.model.engines import ModelFiles

    assert ModelFiles.packaged().candidate_review is None
