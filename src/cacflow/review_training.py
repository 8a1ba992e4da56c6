"""Fitting the candidate review (``cacflow.candidate_review``) on generated scans.

The review learns from the network it serves: each phantom goes through the model's
CPU engine, every small candidate the review would decide gets its features, and its
truth is whether any of its voxels belongs to a coronary plaque's rendering (the
generator's ``coronary_labels``; ``phantom.image_reference`` counts the same groups).

Phantoms come from two training streams of their own (seeds that no check and no
cohort uses), drawn as the training phantoms are: one with faint specks added
(``PhantomSettings.speck_lesions``), where the network's misses lie, and one without,
for the scans without coronary calcium and their noise.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from cacflow.atomic import atomic_write_text
from cacflow.candidate_review import CandidateReview, fit_logistic

log = logging.getLogger("cacflow.review_training")

REVIEW_SEED = 61_000_001  # streams REVIEW_SEED (with specks) and REVIEW_SEED + 1 (without)
REVIEW_PHANTOMS = (160, 100)  # with specks, without


def phantoms_for_review(seed: int = REVIEW_SEED, counts: tuple[int, int] = REVIEW_PHANTOMS):
    """The review's phantoms, in order: ``counts[0]`` from stream ``seed`` with specks,
    then ``counts[1]`` from stream ``seed + 1`` without."""
    from cacflow.training import training_phantom

    for stream, n, specks in ((seed, counts[0], True), (seed + 1, counts[1], False)):
        for index in range(n):
            yield training_phantom(stream, index, speck_lesions=specks)


def review_candidates(segmenter, phantom, min_share: float, max_area_mm2: float):
    """(features, coronary truth) of the candidates a review with these bounds decides."""
    from cacflow.inference import candidate_votes, engine_logits, review_features
    from cacflow.model.preprocessing import network_inputs

    hu, threshold = phantom.hu, segmenter.threshold_hu
    inputs, grid = network_inputs(hu, phantom.spacing_mm, threshold, input_set=segmenter.input_set)
    candidates = candidate_votes(hu, engine_logits(segmenter.engine, inputs, segmenter.batch_slices), grid, threshold)
    pixel_area = phantom.spacing_mm[1] * phantom.spacing_mm[2]
    chosen, features = review_features(hu, candidates, candidates.coronary_share, pixel_area, min_share,
                                       max_area_mm2, threshold)
    return features, candidates.holding(phantom.coronary_labels > 0)[chosen]


def fit_candidate_review(model_dir: str | Path, seed: int = REVIEW_SEED, counts: tuple[int, int] = REVIEW_PHANTOMS,
                         workers: int = 2, min_share: float = 0.01, max_area_mm2: float = 10.0,
                         table: str | Path | None = None) -> CandidateReview:
    """Fit the review for the model in ``model_dir`` and record it in its model.json
    (``candidate_review``, with the phantoms it was fitted on). ``table``: also save
    every candidate's features and truth there (.npz), for analysis."""
    from cacflow.inference import CalciumSegmenter
    from cacflow.model.engines import ModelFiles, create_engine

    model_dir = Path(model_dir)
    model = ModelFiles(model_dir)
    # The network's own votes (not CalciumSegmenter.for_model: no review, no re-vote),
    # on the inputs it was trained on.
    segmenter = CalciumSegmenter(create_engine("onnxruntime", model, threads=workers), input_set=model.input_set)
    features, truth, phantom_of = [], [], []
    for number, phantom in enumerate(phantoms_for_review(seed, counts)):
        f, t = review_candidates(segmenter, phantom, min_share, max_area_mm2)
        features.append(f)
        truth.append(t)
        phantom_of.append(np.full(len(t), number))
        log.info("review phantom %d/%d: %d candidates, %d coronary", number + 1, sum(counts), len(t), int(t.sum()))
    features, truth, phantom_of = np.concatenate(features), np.concatenate(truth), np.concatenate(phantom_of)
    if table is not None:
        np.savez(table, features=features, coronary=truth, phantom=phantom_of)
    if truth.all() or not truth.any():  # also when there are none
        raise ValueError(f"the candidate review needs coronary and other small candidates to learn from; "
                         f"{sum(counts)} phantoms gave {int(truth.sum())} and {int((~truth).sum())}: fit it on more")
    review = fit_logistic(features, truth, min_share=min_share, max_area_mm2=max_area_mm2)
    info_path = model_dir / "model.json"
    info = json.loads(info_path.read_text())
    info["candidate_review"] = {
        **review.to_dict(),
        "fitted_on": {"seed": seed, "phantoms_with_specks": counts[0], "phantoms_without": counts[1],
                      "engine": segmenter.engine.label, "candidates": int(len(truth)),
                      "coronary_candidates": int(truth.sum())},
    }
    atomic_write_text(info_path, json.dumps(info, indent=2) + "\n")
    return review


# The patch review's phantoms (cacflow.patch_review): training streams no check or
# cohort uses, with faint specks, plain, and with scattered and perivascular blobs; the
# fourth, used only when a fourth count is given, with specks and the calcium of kinds
# the network never sees (breast arteries, hilar nodes, lung granulomas, costal
# cartilage), drawn from a stream of its own, not the checks' seeds.
PATCH_REVIEW_STREAMS = (
    (61_000_001, {"speck_lesions": True}),
    (61_000_002, {}),
    (61_000_003, {"scattered_calcium": True, "perivascular_calcium": True}),
    (61_000_004, {"speck_lesions": True, "unfamiliar_calcium": True}),
)
PATCH_REVIEW_PHANTOMS = (240, 120, 160)
PATCH_TRAINING_PIXELS = 72  # patches cut larger, for random shifts of up to 4 pixels
PATCH_FIT_SEED = 7001
# The patch review is fitted on every small candidate with at least this coronary share;
# its ``min_share`` (which ones it decides) may be higher (the eighth candidate: 0.1).
PATCH_FIT_MIN_SHARE = 0.01

_patch_segmenter = None  # one engine per extraction worker


def _extract_patch_phantom(job) -> int:
    """Save the patches, wide views, scalars and truth of one phantom's reviewed
    candidates (``{out}/{stream}_{index}.npz``, written atomically so an interrupted run
    resumes; one cut without wide views is cut again when they are wanted)."""
    global _patch_segmenter
    model_dir, out_dir, stream, options, index, max_area_mm2, with_context = job
    out = Path(out_dir) / f"{stream}_{index:04d}.npz"
    if out.exists():
        saved = np.load(out)
        if "context" in saved or not with_context:
            return int(len(saved["coronary"]))
    from cacflow.candidate_review import candidates_to_review, scan_noise_hu
    from cacflow.inference import CalciumSegmenter, candidate_votes, engine_logits
    from cacflow.model.engines import ModelFiles, create_engine
    from cacflow.model.preprocessing import network_inputs
    from cacflow.patch_review import candidate_patches, candidate_scalars, context_patches
    from cacflow.training import training_phantom

    if _patch_segmenter is None:
        model = ModelFiles(Path(model_dir))
        _patch_segmenter = CalciumSegmenter(create_engine("onnxruntime", model, threads=1), input_set=model.input_set)
    phantom = training_phantom(stream, index, **options)
    hu, spacing = phantom.hu, phantom.spacing_mm
    inputs, grid = network_inputs(hu, spacing, _patch_segmenter.threshold_hu, input_set=_patch_segmenter.input_set)
    logits = engine_logits(_patch_segmenter.engine, inputs, _patch_segmenter.batch_slices)
    candidates = candidate_votes(hu, logits, grid, _patch_segmenter.threshold_hu)
    share = candidates.coronary_share
    area_mm2 = candidates.areas_mm2(spacing[1] * spacing[2])
    chosen = np.flatnonzero(candidates_to_review(share, area_mm2, PATCH_FIT_MIN_SHARE, max_area_mm2))
    coronary = candidates.holding(phantom.coronary_labels > 0)
    noise = scan_noise_hu(hu)
    patches = candidate_patches(hu, candidates.components, chosen, logits, grid, spacing, noise,
                                _patch_segmenter.threshold_hu, pixels=PATCH_TRAINING_PIXELS)
    context = context_patches(hu, candidates.components, chosen, logits, grid, spacing)
    partial = out.with_name(out.stem + ".partial.npz")
    np.savez(partial, patches=patches.astype(np.float16), context=context.astype(np.float16),
             scalars=candidate_scalars(share[chosen], area_mm2[chosen], noise), coronary=coronary[chosen],
             share=share[chosen])
    partial.replace(out)
    return len(chosen)


def _shifted_and_flipped(patches: np.ndarray, rng: np.random.Generator, pixels: int,
                         context: np.ndarray | None = None):
    """Patches shifted at random within their margin and flipped at random; the wide
    views, if any, flipped alike (not shifted: a few fine pixels are a fraction of one
    of theirs)."""
    margin = patches.shape[-1] - pixels
    out = np.empty(patches.shape[:2] + (pixels, pixels), dtype=np.float32)
    views = None if context is None else np.array(context, dtype=np.float32)
    for i, patch in enumerate(patches):
        dy, dx = rng.integers(0, margin + 1, 2)
        patch = patch[:, dy : dy + pixels, dx : dx + pixels]
        if rng.random() < 0.5:
            patch = patch[:, :, ::-1]
            if views is not None:
                views[i] = views[i][:, :, ::-1]
        if rng.random() < 0.5:
            patch = patch[:, ::-1, :]
            if views is not None:
                views[i] = views[i][:, ::-1, :]
        out[i] = patch
    return out, views


def _tensor(array):
    import torch

    return None if array is None else torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def fit_patch_network(patches: np.ndarray, scalars: np.ndarray, coronary: np.ndarray, phantom_of: np.ndarray,
                      epochs: int = 30, batch: int = 64, learning_rate: float = 2e-3, seed: int = PATCH_FIT_SEED,
                      context: np.ndarray | None = None):
    """Fit a PatchNet (binary cross-entropy, AdamW, one-cycle schedule, random shifts and
    flips); every seventh phantom is held out and the epoch with the lowest loss on
    them is kept. With ``context`` (the candidates' wide views) the network has a
    branch for them. Returns (network, record of the fit)."""
    import torch

    from cacflow.patch_review import PATCH_PIXELS, PatchNet

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    held_out = (phantom_of % 7) == 3
    train, check = np.flatnonzero(~held_out), np.flatnonzero(held_out)
    margin = (patches.shape[-1] - PATCH_PIXELS) // 2
    check_patches = _tensor(patches[check][:, :, margin : margin + PATCH_PIXELS, margin : margin + PATCH_PIXELS])
    check_context = None if context is None else _tensor(context[check])
    check_scalars, check_truth = torch.from_numpy(scalars[check]), torch.from_numpy(coronary[check].astype(np.float32))
    network = PatchNet(context=context is not None)
    steps_per_epoch = max(len(train) // batch, 1)
    optimiser = torch.optim.AdamW(network.parameters(), lr=learning_rate, weight_decay=1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=learning_rate, total_steps=epochs * steps_per_epoch)
    loss_of = torch.nn.BCEWithLogitsLoss()
    best = {"held_out_loss": float("inf")}
    for epoch in range(epochs):
        network.train()
        order = rng.permutation(train)
        for step in range(steps_per_epoch):
            rows = order[step * batch : (step + 1) * batch]
            inputs, views = _shifted_and_flipped(patches[rows], rng, PATCH_PIXELS,
                                                 None if context is None else context[rows])
            logits = network(torch.from_numpy(inputs), torch.from_numpy(scalars[rows]), _tensor(views))
            loss = loss_of(logits, torch.from_numpy(coronary[rows].astype(np.float32)))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
        if len(check) == 0:
            best = {"epoch": epoch, "state": network.state_dict()}
            continue
        network.eval()
        with torch.no_grad():
            check_logits = network(check_patches, check_scalars, check_context)
        held_out_loss = float(loss_of(check_logits, check_truth))
        called = (check_logits > 0).numpy()
        log.info("patch review epoch %d: held-out loss %.4f, coronary found %d/%d, false %d/%d", epoch, held_out_loss,
                 int((called & coronary[check]).sum()), int(coronary[check].sum()),
                 int((called & ~coronary[check]).sum()), int((~coronary[check]).sum()))
        if held_out_loss < best["held_out_loss"]:
            best = {"held_out_loss": held_out_loss, "epoch": epoch,
                    "state": {k: v.clone() for k, v in network.state_dict().items()},
                    "held_out_found": int((called & coronary[check]).sum()),
                    "held_out_false": int((called & ~coronary[check]).sum())}
    network.load_state_dict(best.pop("state"))
    record = {"epochs": epochs, "batch": batch, "learning_rate": learning_rate, "seed": seed, "context": context is not None,
              "held_out_candidates": int(len(check)), "held_out_coronary": int(coronary[check].sum()), **best}
    return network, record


def fit_patch_review(model_dir: str | Path, work_dir: str | Path, counts: tuple[int, ...] = PATCH_REVIEW_PHANTOMS,
                     workers: int = 2, min_share: float = 0.01, max_area_mm2: float = 5.0, epochs: int = 30,
                     context: bool = False, scan_types: tuple[str, ...] = ("gated", "nongated")):
    """Fit the patch review for the model in ``model_dir`` and store it beside it
    (``patch_review.pt``, model.json ``patch_review``). Patches are cut into
    ``work_dir`` one phantom at a time (resumable), by the model's int8 engine, from
    ``counts`` phantoms of the ``PATCH_REVIEW_STREAMS``. It is fitted on candidates with
    a share of at least ``PATCH_FIT_MIN_SHARE`` and decides those with ``min_share``.
    ``context``: the network also reads each candidate's wide view. ``scan_types``: the
    scan types it decides on (it is fitted on both; the others keep the network's calls)."""
    from multiprocessing import get_context

    import torch

    from cacflow.patch_review import PatchReview, checked_scan_types

    scan_types = checked_scan_types(scan_types)
    model_dir, work_dir = Path(model_dir), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    if min_share < PATCH_FIT_MIN_SHARE:
        raise ValueError(f"the patch review is fitted on shares of at least {PATCH_FIT_MIN_SHARE}; min_share {min_share} "
                         f"would let it decide candidates it never saw")
    jobs = [(str(model_dir), str(work_dir), stream, options, index, max_area_mm2, context)
            for (stream, options), n in zip(PATCH_REVIEW_STREAMS, counts) for index in range(n)]
    with get_context("spawn").Pool(workers) as pool:
        for done, n in enumerate(pool.imap(_extract_patch_phantom, jobs), 1):
            if done % 20 == 0 or done == len(jobs):
                log.info("patch review: %d/%d phantoms cut", done, len(jobs))
    tables = [np.load(work_dir / f"{stream}_{index:04d}.npz") for _, _, stream, _, index, *_ in jobs]
    phantom_of = np.concatenate([np.full(len(t["coronary"]), number) for number, t in enumerate(tables)])
    patches, scalars, coronary = (np.concatenate([t[key] for t in tables]) for key in ("patches", "scalars", "coronary"))
    if coronary.all() or not coronary.any():
        raise ValueError(f"the patch review needs coronary and other small candidates to learn from; "
                         f"{len(jobs)} phantoms gave {int(coronary.sum())} and {int((~coronary).sum())}: fit it on more")
    views = np.concatenate([t["context"] for t in tables]) if context else None
    network, fit = fit_patch_network(patches, scalars, coronary.astype(bool), phantom_of, epochs=epochs, context=views)
    atomic_torch_save = work_dir / "patch_review.pt.partial"
    torch.save(network.state_dict(), atomic_torch_save)
    atomic_torch_save.replace(model_dir / "patch_review.pt")
    info_path = model_dir / "model.json"
    info = json.loads(info_path.read_text())
    info["patch_review"] = {
        "weights": "patch_review.pt", "min_share": min_share, "max_area_mm2": max_area_mm2, "context": context,
        "scan_types": list(scan_types),
        "fitted_on": {"streams": [{"seed": s, **o, "phantoms": n} for (s, o), n in zip(PATCH_REVIEW_STREAMS, counts)],
                      "fit_min_share": PATCH_FIT_MIN_SHARE, "candidates": int(len(coronary)),
                      "coronary_candidates": int(coronary.sum()), **fit},
    }
    atomic_write_text(info_path, json.dumps(info, indent=2) + "\n")
    return PatchReview(network, min_share, max_area_mm2, scan_types)
