"""Train CalciumNet on generated phantoms, reproducibly and resumably.

Stages (each resumable):
1. ``build_dataset``: generate phantoms with randomised settings (seeded) and
   store the network inputs/targets per volume as .npy files.
2. ``train``: SGD on random crops around calcium; checkpoint every
   ``checkpoint_every`` steps (model, optimiser, RNG state) and resume from the
   newest checkpoint when restarted.
3. ``export``: write ``calciumnet.pt`` (weights), ``calciumnet.onnx`` (checked
   against PyTorch) and ``model.json`` into the model directory.

An ensemble (``members``: the shipped model) runs stage 2 once per member, each
from its own checkpoints in ``work_dir/member<k>/`` on the first ``volumes`` phantoms
of the shared dataset, then exports the members together (``CalciumEnsemble``).
A member whose model is written is not trained again.

A second stage (``negatives_tune``; the shipped model's is ``SHIPPED_NEGATIVES_TUNE``,
docs/evaluation.md): the trained ensemble, all members together, is tuned on
phantoms that also hold calcified blobs scattered through the chest away from the
arteries (``PhantomSettings.scattered_calcium``) and, optionally, beside the great
vessels (``perivascular_calcium``), so that calcium of a look the simulator never
draws is less often called coronary. The first stage goes to
``work_dir`` (its model to ``work_dir/base_model``), the tune to
``work_dir/negatives_tune``, each from its own dataset and checkpoints.

Fine-tuning on real annotated scans: with ``coca_root`` set, stage 1 reads a
COCA-format root (``patient/<id>/<series>/`` DICOM and ``calcium_xml/<id>.xml``
polygons, ``cacflow.coca``) instead of generating phantoms, and ``init_weights``
starts the network from a trained model (normally the shipped one).
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cacflow.atomic import atomic_write_text
from cacflow.disk import require_free_space
from cacflow.model.engines import file_sha256
from cacflow.model.quantization import CALIBRATION_PHANTOMS
from cacflow.model.preprocessing import (
    IGNORE_INDEX,
    SIZE_MULTIPLE,
    TARGET_SPACING_MM,
    artery_targets,
    input_channels,
    input_set_record,
    network_inputs,
    network_targets,
    size_multiple,
)

if TYPE_CHECKING:
    from cacflow.synth.phantom import PhantomSettings

log = logging.getLogger("cacflow.training")


@dataclass(frozen=True)
class NegativesTune:
    """The trained network or ensemble (all members together) tuned on phantoms with
    scattered calcified blobs, negatives of any look, and optionally blobs beside the
    great vessels (docs/evaluation.md)."""

    volumes: int
    steps: int
    learning_rate: float = 5e-4
    perivascular_calcium: bool = False
    speck_lesions: bool = False  # and faint, tiny coronary plaques (PhantomSettings.speck_lesions)


@dataclass
class TrainingConfig:
    work_dir: str
    model_dir: str
    seed: int = 20261126
    n_volumes: int = 800  # phantoms of one network (an ensemble: the dataset's size)
    steps: int = 30000  # steps of one network, or of a COCA fine-tune
    # (volumes, steps) of each member of an ensemble trained on the same phantoms with
    # the same seed; () trains one network of n_volumes / steps. SHIPPED_MEMBERS is the
    # shipped model's first stage.
    members: tuple[tuple[int, int], ...] = ()
    batch_size: int = 8
    crop: int = 96  # 144 mm at 1.5 mm: enough context to tell the arteries apart
    learning_rate: float = 2e-3
    widths: tuple[int, ...] = (16, 24, 32, 48, 64)
    # The sampler balances vessels and negatives; a false "coronary" costs as much as a miss.
    class_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0)
    checkpoint_every: int = 100
    workers: int = 2
    model_version: str = "0.4.0"
    notes: dict = field(default_factory=dict)
    coca_root: str | None = None  # fine-tune on COCA-format annotations instead of phantoms
    init_weights: str | None = None  # start from these weights (calciumnet.pt)
    device: str = "auto"  # auto (a CUDA GPU when there is one, else the CPU) | cpu | cuda
    dataset_dir: str | None = None  # None: work_dir/dataset
    # Phantom acquisitions (ACQUISITION_RECIPES): "standard" (the shipped model's) or "wide".
    acquisition: str = "standard"
    # Training phantoms also hold calcified blobs scattered through the chest away from
    # the coronary arteries (PhantomSettings.scattered_calcium): negatives of any look.
    scattered_calcium: bool = False
    # ... and calcified blobs in clusters and chains just outside the great vessels
    # (PhantomSettings.perivascular_calcium): negatives where they pass most easily for
    # the left main and proximal arteries.
    perivascular_calcium: bool = False
    # ... and 1-3 extra faint, tiny coronary plaques at the edge of what a scan shows
    # (PhantomSettings.speck_lesions): positives the risk mix holds in a few scans only.
    speck_lesions: bool = False
    # The network's input channels (cacflow.model.preprocessing.INPUT_SETS): "standard"
    # (the shipped model's) or "subcell" (also each quarter pixel's calcium fraction).
    # Starting weights with fewer input channels get zero weights for the new ones.
    input_set: str = "standard"
    # Above 0: the network also learns an artery map (which artery each pixel lies on,
    # calcified or not; cacflow.model.network ``artery_head``) on every pixel of its
    # crops, its cross-entropy weighted by this beside the calcium loss. The map is
    # dropped before export. Phantoms only: COCA marks calcium, not the arteries.
    artery_loss_weight: float = 0.0
    # Phantoms that calibrate the int8 copy of the graph for the CPU engine
    # (cacflow.model.quantization); 0 writes none (that engine then runs the float graph).
    int8_calibration_phantoms: int = CALIBRATION_PHANTOMS
    # Phantoms (with specks, without) the candidate review is fitted on after training
    # (cacflow.review_training; the shipped model's: REVIEW_PHANTOMS); (0, 0) fits
    # none, and the network then decides alone. A COCA fine-tune fits none either.
    review_phantoms: tuple[int, int] = (0, 0)
    # Phantoms (with specks, plain, with blobs) the patch review is fitted on after
    # training (cacflow.patch_review; tried: review_training.PATCH_REVIEW_PHANTOMS), and
    # optionally a fourth count, with specks and unfamiliar calcium; (0, 0, 0) fits none.
    # It decides candidates with a share of patch_review_min_share up.
    patch_review_phantoms: tuple[int, ...] = (0, 0, 0)
    patch_review_min_share: float = 0.01
    # The patch review also reads a 144 mm wide view of each candidate's slice.
    patch_review_context: bool = False
    # The scan types the patch review decides on; the others keep the network's calls.
    patch_review_scan_types: tuple[str, ...] = ("gated", "nongated")
    # Then tune what the members trained into on phantoms with scattered blobs (and,
    # if the tune says so, perivascular ones; SHIPPED_NEGATIVES_TUNE is the shipped
    # model's); None: stop after the members (CalciumNet 0.3.0's recipe).
    negatives_tune: NegativesTune | None = None

    def __post_init__(self) -> None:
        # Checked here, before a dataset folder is claimed for the recipe (dataset.json).
        _check_acquisition(self.acquisition)
        # The engines pad every slice to SIZE_MULTIPLE; a network that pools more often
        # would fail only at export, hours into a run.
        network_multiple = size_multiple(self.widths)
        if SIZE_MULTIPLE % network_multiple or self.crop % network_multiple:
            raise ValueError(f"widths {tuple(self.widths)} pool {len(self.widths) - 1} times, so the network takes "
                             f"sizes that are multiples of {network_multiple}: the crop ({self.crop}) and the "
                             f"engines' padding (cacflow.model.preprocessing.SIZE_MULTIPLE = {SIZE_MULTIPLE}) "
                             "must both be")
        if self.artery_loss_weight < 0:
            raise ValueError(f"artery_loss_weight must be 0 or more, not {self.artery_loss_weight}")
        if self.learns_arteries and self.coca_root:
            raise ValueError("an artery map is learned on phantoms only: COCA annotations mark calcium, not the "
                             "arteries (leave artery_loss_weight at 0 for a COCA fine-tune)")

    @property
    def learns_arteries(self) -> bool:
        """Whether the network also learns the artery map (``artery_loss_weight``)."""
        return self.artery_loss_weight > 0

    @property
    def data_dir(self) -> Path:
        return Path(self.dataset_dir) if self.dataset_dir else Path(self.work_dir) / "dataset"


# CalciumNet 0.4.0: the 0.1.0 recipe (400 phantoms, 20000 steps) and the 0.2.0 one
# (800, 30000), averaged (together CalciumNet 0.3.0, chosen on the validation
# phantoms), then tuned together on 400 phantoms with scattered and perivascular
# blobs for 5000 steps; adopted by the rule set down before it was trained
# (docs/evaluation.md).
SHIPPED_MEMBERS = ((400, 20000), (800, 30000))
SHIPPED_NEGATIVES_TUNE = NegativesTune(400, 5000, 5e-4, perivascular_calcium=True)


TRAINING_DEVICES = ("auto", "cpu", "cuda")


def resolve_training_device(requested: str) -> str:
    """The torch device training runs on. ``auto`` takes a CUDA GPU when torch sees
    one; asking for ``cuda`` where there is none is an error, not a silent CPU run
    (a job sized for a GPU would take hours on a CPU)."""
    import torch

    if requested not in TRAINING_DEVICES:
        raise ValueError(f"unknown training device {requested!r}: use one of {', '.join(TRAINING_DEVICES)}")
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if os.environ.get("CUDA_VISIBLE_DEVICES", "").strip() not in ("", "-1"):
            log.warning("a GPU was granted (CUDA_VISIBLE_DEVICES=%s) but torch %s cannot use it (CUDA build %s): "
                        "training on the CPU", os.environ["CUDA_VISIBLE_DEVICES"], torch.__version__,
                        torch.version.cuda)
        return "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("training device 'cuda' was asked for, but torch sees no CUDA GPU on this node "
                           f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); "
                           "use --device auto or cpu, or run on a GPU node")
    return requested


# In-plane pixel spacing of the training phantoms: gated (zoomed cardiac) and non-gated
# (chest) fields of view. model.json records the whole span ("training_ranges"), and
# scans outside it are marked (scans table: outside_model_range).
GATED_PIXEL_SPACING_MM = (0.30, 0.50)
NONGATED_PIXEL_SPACING_MM = (0.60, 0.85)

# The "wide" acquisition recipe (`cacflow train --acquisition wide`): gated scans up to
# 0.60 mm (fields of view to 307 mm), non-gated chest CT up to 0.98 mm (500 mm), and 80
# to 140 kVp. Drawn after the standard settings, from a stream of the phantom's own, so
# the standard recipe (the shipped model's) draws exactly as before. Tried and not
# adopted: it did no better on those acquisitions (docs/evaluation.md).
WIDE_GATED_PIXEL_SPACING_MM = (0.30, 0.60)
WIDE_NONGATED_PIXEL_SPACING_MM = (0.60, 0.98)
WIDE_KVPS = (80, 100, 120, 120, 120, 140)
ACQUISITION_RECIPES = ("standard", "wide")


def widened_acquisition(settings, rng: np.random.Generator):
    """``settings`` drawn by ``randomised_phantom_settings``, re-imaged with the wide
    recipe's pixel spacing and kVp (``rng``: the acquisition's own stream)."""
    span = WIDE_GATED_PIXEL_SPACING_MM if settings.gated else WIDE_NONGATED_PIXEL_SPACING_MM
    return replace(settings, pixel_spacing_mm=float(rng.uniform(*span)), kvp=int(rng.choice(WIDE_KVPS)))


def training_pixel_spacing_span(acquisition: str) -> tuple[float, float]:
    """[lowest, highest] in-plane pixel spacing of a recipe's phantoms (model.json)."""
    if acquisition == "wide":
        return WIDE_GATED_PIXEL_SPACING_MM[0], WIDE_NONGATED_PIXEL_SPACING_MM[1]
    return GATED_PIXEL_SPACING_MM[0], NONGATED_PIXEL_SPACING_MM[1]


def _check_acquisition(acquisition: str) -> None:
    if acquisition not in ACQUISITION_RECIPES:
        raise ValueError(f"unknown acquisition recipe {acquisition!r}; choose one of {', '.join(ACQUISITION_RECIPES)}")


def training_phantom_settings(rng: np.random.Generator, acquisition: str = "standard"):
    """One training phantom's settings under the ``acquisition`` recipe."""
    _check_acquisition(acquisition)
    settings = randomised_phantom_settings(rng)
    if acquisition == "wide":
        settings = widened_acquisition(settings, np.random.default_rng([int(rng.integers(2**31)), 7]))
    return settings


def randomised_phantom_settings(rng: np.random.Generator):
    """Settings that span what real archives hold (issue: generalise to any scanner)."""
    from cacflow.synth.phantom import PhantomSettings

    gated = rng.random() < 0.7
    if gated:
        pixel_spacing = float(rng.uniform(*GATED_PIXEL_SPACING_MM))
        thickness = float(rng.choice([2.5, 3.0, 3.0, 3.0]))
    else:
        pixel_spacing = float(rng.uniform(*NONGATED_PIXEL_SPACING_MM))
        thickness = float(rng.choice([2.5, 3.0, 5.0]))
    increment = thickness if rng.random() < 0.8 else thickness / 2
    return PhantomSettings(
        pixel_spacing_mm=pixel_spacing,
        fov_centre="heart" if gated else str(rng.choice(["body", "body", "heart"])),
        slice_thickness_mm=thickness,
        slice_increment_mm=increment,
        kvp=int(rng.choice([100, 120, 120, 120])),
        noise_hu=float(rng.uniform(10.0, 45.0)),
        gated=gated,
        include_distractors=True,
    )


def training_phantom(seed: int, index: int, acquisition: str = "standard", scattered_calcium: bool = False,
                     perivascular_calcium: bool = False, speck_lesions: bool = False, unfamiliar_calcium: bool = False):
    """Phantom ``index`` of the training stream ``seed`` (what the dataset holds).
    ``unfamiliar_calcium``: also breast arteries, hilar nodes, lung granulomas and
    costal cartilage (only the patch review's fourth stream; the network never sees them)."""
    from cacflow.synth.phantom import generate_phantom

    rng = np.random.default_rng([seed, index])
    settings = replace(training_phantom_settings(rng, acquisition), scattered_calcium=scattered_calcium,
                       perivascular_calcium=perivascular_calcium, speck_lesions=speck_lesions,
                       unfamiliar_calcium=unfamiliar_calcium)
    return generate_phantom(int(rng.integers(2**31)), settings)


def artery_labels(phantom) -> np.ndarray:
    """Where each artery runs in ``phantom``: its tube (lumen and wall) and its plaques,
    which the generator lets bulge past the wall (a fifth to a quarter of the calcified
    voxels in some phantoms)."""
    return np.where(phantom.vessel_labels > 0, phantom.vessel_labels, phantom.coronary_labels)


def _build_one(args) -> dict:
    index, recipe, out_dir = args
    from scipy import ndimage

    stream = {key: value for key, value in recipe.items() if key not in ("input_set", "artery_targets")}
    phantom = training_phantom(index=index, **stream)
    inputs, grid = network_inputs(phantom.hu, phantom.spacing_mm, input_set=recipe.get("input_set", "standard"))
    targets = network_targets(phantom.hu, phantom.coronary_labels, grid)
    # Hard negatives: non-coronary calcium within ~10 mm of a coronary artery (stents,
    # aortic wall and valve, mitral annulus, noise), present even without coronary calcium.
    near_artery = grid.box_mean((phantom.vessel_labels > 0).astype(np.float32)) > 0
    reach = int(round(10.0 / TARGET_SPACING_MM))
    near_artery = ndimage.binary_dilation(near_artery, structure=np.ones((1, 3, 3), bool), iterations=reach)
    # Scattered and perivascular blobs (--scattered-calcium, --perivascular-calcium) join
    # the pool wherever they lie: many are far from an artery, and the "any calcium"
    # crops, mostly bone, would seldom reach them.
    blobs = ("scattered", "perivascular")
    for blob in (d for d in phantom.distractors if d["kind"] in blobs and d["agatston_if_scored"] > 0):
        z, row, col = (int(round(v)) for v in blob["centre_voxel_zyx"])
        if 0 <= z < len(near_artery) and 0 <= row < len(grid.row_index) and 0 <= col < len(grid.col_index):
            near_artery[z, grid.row_index[row], grid.col_index[col]] = True
    arteries = None
    if recipe.get("artery_targets"):  # a pixel whose calcium is an artery's lies on that artery
        arteries = np.where(targets > 0, targets, artery_targets(artery_labels(phantom), grid))
    slices = _save_volume(out_dir, index, inputs, targets, near_artery, arteries)
    return {"index": index, "slices": slices, "coronary_pixels": int((targets > 0).sum())}


# What one training volume takes on disk: 20-30 MB measured for phantoms (float16
# inputs, 6 channels, of the slices that hold calcium), so 400 phantoms take about
# 10 GB. Taken for COCA scans too (not measured: their slices are 512 x 512 as well).
BYTES_PER_TRAINING_VOLUME = 30 * 2**20


def _check_disk_space(folder: Path, n_volumes: int) -> None:
    require_free_space(folder, n_volumes * BYTES_PER_TRAINING_VOLUME, f"{n_volumes} training volumes",
                       "free some space, or train on a larger disk (cacflow train --work-dir; snakemake "
                       "train works in results/training or results/training_coca, which can be a link "
                       "to a folder on another disk)")


def _missing_volumes(data_dir: Path, n_volumes: int) -> list[int]:
    """Indices of the first ``n_volumes`` phantoms not yet generated in ``data_dir``."""
    return [i for i in range(n_volumes) if not (data_dir / f"{i:05d}_targets.npy").exists()]


def build_dataset(config: TrainingConfig) -> Path:
    data_dir = config.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    _claim_dataset(data_dir, _dataset_recipe(config))
    todo = [(i, _dataset_recipe(config), data_dir) for i in _missing_volumes(data_dir, config.n_volumes)]
    _check_disk_space(data_dir, len(todo))
    log.info("dataset: %d of %d volumes to generate", len(todo), config.n_volumes)
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=config.workers) as pool:
        for done, info in enumerate(pool.map(_build_one, todo), 1):
            if done % 10 == 0 or done == len(todo):
                rate = done / (time.perf_counter() - started)
                log.info("dataset: %d/%d volumes (%.2f/s, %.0f s left)", done, len(todo), rate, (len(todo) - done) / rate)
    return data_dir


# What a training stream can add to its phantoms: fields of TrainingConfig and of
# PhantomSettings, and arguments of training_phantom / training_stream, all so named.
STREAM_OPTIONS = ("scattered_calcium", "perivascular_calcium", "speck_lesions")


def training_stream(seed: int, acquisition: str = "standard", scattered_calcium: bool = False,
                    perivascular_calcium: bool = False, speck_lesions: bool = False) -> dict:
    """What the phantoms of a training stream depend on, as dataset.json and the int8
    copy's calibration record it (keys named as ``training_phantom``'s arguments). The
    ``STREAM_OPTIONS`` are named only when asked for, so records written before they
    existed keep their form."""
    asked = (scattered_calcium, perivascular_calcium, speck_lesions)
    return {"seed": seed, "acquisition": acquisition,
            **{option: True for option, on in zip(STREAM_OPTIONS, asked) if on}}


def _dataset_recipe(config: TrainingConfig) -> dict:
    """The phantom stream, the input set when it is not the standard one (a dataset
    holds the network's inputs, so two input sets never share one), and whether it
    holds artery-map targets."""
    return {**training_stream(config.seed, config.acquisition, **{option: getattr(config, option)
                                                                  for option in STREAM_OPTIONS}),
            **input_set_record(config.input_set),
            **({"artery_targets": True} if config.learns_arteries else {})}


def _claim_dataset(data_dir: Path, recipe: dict) -> None:
    """Record which recipe a dataset folder holds (dataset.json), and refuse to add to
    or train on one generated with another: its phantoms would be silently mixed in.
    A folder from before this record (volumes, no dataset.json) is taken as it is."""
    record = data_dir / "dataset.json"
    if record.exists():
        held = json.loads(record.read_text())
        if held != recipe:
            raise ValueError(f"the phantom dataset in {data_dir} was generated with {held}, not {recipe}: "
                             "delete that folder, or give this recipe a work folder of its own")
        return
    atomic_write_text(record, json.dumps(recipe) + "\n")


def _save_volume(out_dir: Path, index: int, inputs, targets, near_coronary, arteries=None) -> int:
    keep = (targets != IGNORE_INDEX).any(axis=(1, 2))
    if arteries is not None:  # written before the targets, whose file marks the volume done
        np.save(out_dir / f"{index:05d}_arteries.npy", arteries[keep].astype(np.int8))
    np.save(out_dir / f"{index:05d}_inputs.npy", inputs[keep].astype(np.float16))
    np.save(out_dir / f"{index:05d}_hard_negatives.npy",
            np.argwhere((targets[keep] == 0) & near_coronary[keep]).astype(np.int32))
    np.save(out_dir / f"{index:05d}_targets.npy", targets[keep].astype(np.int8))
    return int(keep.sum())


def build_coca_dataset(coca_root: str | Path, data_dir: Path, input_set: str = "standard") -> int:
    """Training volumes from COCA-format annotations; returns how many are usable.

    Targets: calcium (>= 130 HU) inside a reader's coronary polygon takes that
    artery's label, all other calcium is "not coronary". Hard negatives: other
    calcium within 10 mm of annotated coronary calcium (COCA has no artery
    centrelines). A patient that cannot be read is skipped with its reason in
    ``coca_index.json`` and the log; the others still train.
    """
    from scipy import ndimage

    from cacflow.coca import label_volume, patient_ids, read_calcium_xml, read_dicom_series

    root = Path(coca_root)
    data_dir.mkdir(parents=True, exist_ok=True)
    index_path = data_dir / "coca_index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"used": [], "skipped": {}}
    reach = int(round(10.0 / TARGET_SPACING_MM))
    todo = [coca_id for coca_id in patient_ids(root) if coca_id not in index["used"] and coca_id not in index["skipped"]]
    _check_disk_space(data_dir, len(todo))  # a full disk would otherwise skip every patient after it
    for coca_id in todo:
        try:
            series_dirs = sorted(p for p in (root / "patient" / coca_id).iterdir() if p.is_dir())
            if len(series_dirs) != 1:
                raise ValueError(f"expected one series folder, found {len(series_dirs)}")
            rois = read_calcium_xml(root / "calcium_xml" / f"{coca_id}.xml")
            volume = read_dicom_series(series_dirs[0]).volume
            labels, _ = label_volume(rois, volume)
            inputs, grid = network_inputs(volume.hu, volume.spacing_mm, input_set=input_set)
            targets = network_targets(volume.hu, labels, grid)
            near = ndimage.binary_dilation(targets > 0, structure=np.ones((1, 3, 3), bool), iterations=reach)
            _save_volume(data_dir, len(index["used"]), inputs, targets, near)
            index["used"].append(coca_id)
        except Exception as error:  # noqa: BLE001 - one unreadable patient must not stop training
            index["skipped"][coca_id] = f"{type(error).__name__}: {error}"
            log.warning("COCA patient %s skipped: %s", coca_id, index["skipped"][coca_id])
        index_path.write_text(json.dumps(index, indent=2))
    log.info("COCA dataset: %d patients used, %d skipped", len(index["used"]), len(index["skipped"]))
    if not index["used"]:
        raise RuntimeError(f"no usable COCA patient under {root} (see {index_path})")
    return len(index["used"])


def _one_pixel_per_lesion(mask: np.ndarray) -> np.ndarray:
    """One (z, y, x) per connected lesion of ``mask``, so a 2-pixel lesion is drawn
    as often as a 40-pixel one (small lesions decide the low risk categories)."""
    from scipy import ndimage

    components, n = ndimage.label(mask, structure=np.array([[[0] * 3] * 3, [[1] * 3] * 3, [[0] * 3] * 3]))
    if n == 0:
        return np.zeros((0, 3), dtype=np.int64)
    positions = np.argwhere(components > 0)
    first = np.unique(components[tuple(positions.T)], return_index=True)[1]
    return positions[first]


class CropSampler:
    """Random training crops, centred on: a coronary lesion of a vessel drawn uniformly
    among those present, each lesion equally likely whatever its size (45 %: the short
    left main and the smallest lesions are seen as often as the others),
    hard negatives near an artery (30 %), or any calcium (25 %: bone, noise...).

    ``arteries``: the crops also carry their artery-map targets (``batch`` then
    returns them third); the draws are the same either way."""

    def __init__(self, data_dir: Path, n_volumes: int, crop: int, rng: np.random.Generator, arteries: bool = False):
        self.crop = crop
        self.rng = rng
        self.arteries = arteries
        self.volumes = []
        for i in range(n_volumes):
            inputs = np.load(data_dir / f"{i:05d}_inputs.npy", mmap_mode="r")
            targets = np.load(data_dir / f"{i:05d}_targets.npy")
            if len(targets):
                per_vessel = [_one_pixel_per_lesion(targets == vessel) for vessel in range(1, 5)]
                hard = np.load(data_dir / f"{i:05d}_hard_negatives.npy")
                artery_map = np.load(data_dir / f"{i:05d}_arteries.npy", mmap_mode="r") if arteries else None
                self.volumes.append((inputs, targets, [p for p in per_vessel if len(p)], hard,
                                     np.argwhere(targets >= 0), artery_map))

    def batch(self, size: int):
        xs, ys, maps = [], [], []
        for _ in range(size):
            inputs, targets, vessels, hard, calcium, artery_map = self.volumes[self.rng.integers(len(self.volumes))]
            draw = self.rng.random()
            if vessels and draw < 0.45:
                pool = vessels[self.rng.integers(len(vessels))]
            elif len(hard) and draw < 0.75:
                pool = hard
            else:
                pool = calcium
            z, cy, cx = pool[self.rng.integers(len(pool))]
            jitter = self.rng.integers(-self.crop // 3, self.crop // 3 + 1, size=2)
            height, width = targets.shape[1:]
            window = self._window((height, width), cy + jitter[0], cx + jitter[1])
            xs.append(self._crop(inputs[z], window, -1.0))
            # Padding (only ever past the slice's last row or column): air in the
            # windows, no calcium in the calcium channels.
            xs[-1][4:, height:, :] = xs[-1][4:, :, width:] = 0.0
            ys.append(self._crop(targets[z], window, IGNORE_INDEX))
            if self.arteries:
                maps.append(self._crop(artery_map[z], window, IGNORE_INDEX))
        # Inputs stay float16 as stored (exact in float32): the training loop widens
        # them where it runs, on the GPU when there is one, not in this one CPU process.
        batch = (np.stack(xs), np.stack(ys).astype(np.int64))
        return (*batch, np.stack(maps).astype(np.int64)) if self.arteries else batch

    def _window(self, shape, cy, cx) -> tuple[int, int]:
        """Top-left corner of the crop around (cy, cx), inside the slice padded to a crop."""
        h, w = (max(n, self.crop) for n in shape)
        return int(np.clip(cy - self.crop // 2, 0, h - self.crop)), int(np.clip(cx - self.crop // 2, 0, w - self.crop))

    def _crop(self, image, window, pad_value):
        """The crop at ``window`` of ``image`` ([..., H, W]); small fields of view are
        padded (air in the inputs, ignored in the targets)."""
        c, (top, left) = self.crop, window
        h, w = image.shape[-2:]
        pad_h, pad_w = max(0, c - h), max(0, c - w)
        if pad_h or pad_w:
            image = np.pad(image, ((0, 0),) * (image.ndim - 2) + ((0, pad_h), (0, pad_w)), constant_values=pad_value)
        return np.array(image[..., top : top + c, left : left + c])


def train(config: TrainingConfig) -> dict:
    """Train (or resume) the model ``config`` describes and export it to model_dir,
    then fit its candidate review (``config.review_phantoms``) or patch review
    (``config.patch_review_phantoms``)."""
    info = _train_and_export(config)
    if sum(config.review_phantoms) and not config.coca_root:
        from cacflow.review_training import fit_candidate_review

        fit_candidate_review(config.model_dir, counts=tuple(config.review_phantoms), workers=config.workers)
        info = json.loads((Path(config.model_dir) / "model.json").read_text())
    if sum(config.patch_review_phantoms) and not config.coca_root:
        from cacflow.review_training import fit_patch_review

        fit_patch_review(config.model_dir, Path(config.work_dir) / "patch_review", counts=tuple(config.patch_review_phantoms),
                         workers=config.workers, min_share=config.patch_review_min_share,
                         context=config.patch_review_context, scan_types=tuple(config.patch_review_scan_types))
        info = json.loads((Path(config.model_dir) / "model.json").read_text())
    return info


def _train_and_export(config: TrainingConfig) -> dict:
    if config.negatives_tune and not config.coca_root:
        return _train_then_tune(config)
    if config.members and not config.coca_root:  # a COCA fine-tune tunes init_weights as they are
        if len(config.members) > 1:
            return _train_ensemble(config)
        (n_volumes, steps), = config.members
        config = replace(config, n_volumes=n_volumes, steps=steps)
    return _train_network(config)


def _train_then_tune(config: TrainingConfig) -> dict:
    """The members (or single network) as ``config`` describes them, then the negatives
    tune from their weights. model.json's ``training`` and ``members`` describe the
    first stage; its ``negatives_tune`` block the second (recipe, starting weights,
    device, losses)."""
    tune = config.negatives_tune
    work_dir = Path(config.work_dir)
    # Both stages' phantoms, checked before the first: the tune's would otherwise meet
    # a full disk hours later.
    work_dir.mkdir(parents=True, exist_ok=True)
    first_stage_volumes = max((volumes for volumes, _ in config.members), default=config.n_volumes)
    _check_disk_space(work_dir, len(_missing_volumes(config.data_dir, first_stage_volumes))
                      + len(_missing_volumes(work_dir / "negatives_tune" / "dataset", tune.volumes)))
    base = replace(config, negatives_tune=None, model_dir=str(work_dir / "base_model"), notes={},
                   model_version=f"{config.model_version}-base", int8_calibration_phantoms=0)
    base_info = train(base)  # a base already trained is only exported again
    base_weights = Path(base.model_dir) / "calciumnet.pt"
    members = base_info.get("members") or [_member_record(base_info, base_weights)]
    tuned = replace(config, negatives_tune=None, members=(), n_volumes=tune.volumes, steps=tune.steps,
                    learning_rate=tune.learning_rate, scattered_calcium=True,
                    perivascular_calcium=tune.perivascular_calcium, speck_lesions=tune.speck_lesions,
                    dataset_dir=None, notes={},
                    work_dir=str(work_dir / "negatives_tune"), init_weights=str(base_weights))
    network, history = _fit(tuned)
    block = {**negatives_tune_record(tune), "phantoms": _dataset_recipe(tuned),
             "base_weights_sha256": tuned.notes["initial_weights_sha256"],
             "trained_on": tuned.notes["trained_on"], "loss_history": history}
    # ``training`` is the first stage's recipe; its notes are in the member records.
    return export(network, replace(config, notes={}), [], members, negatives_tune=block)


def _member_record(info: dict, weights: Path) -> dict:
    """What model.json's ``members`` holds of one trained network (``info``: its model.json)."""
    return {"n_volumes": info["training"]["n_volumes"], "steps": info["training"]["steps"],
            "weights_sha256": file_sha256(weights), "trained_on": info["training"]["notes"].get("trained_on"),
            "loss_history": info["loss_history"]}


def _train_ensemble(config: TrainingConfig) -> dict:
    import torch

    from cacflow.model.network import CalciumEnsemble

    if config.init_weights:
        raise ValueError("an ensemble is trained from scratch, one member after the other; starting weights "
                         "are for fine-tuning (with a COCA root) or for a single network (one members entry)")
    build_dataset(replace(config, n_volumes=max(volumes for volumes, _ in config.members)))
    weights, members = [], []
    for k, (n_volumes, steps) in enumerate(config.members, 1):
        member_dir = Path(config.work_dir) / f"member{k}"
        # A member is not run on its own in the workflow: no int8 copy of its graph.
        member = replace(config, work_dir=str(member_dir), model_dir=str(member_dir / "model"), members=(),
                         n_volumes=n_volumes, steps=steps, dataset_dir=str(config.data_dir),
                         model_version=f"{config.model_version}-member{k}", notes={}, int8_calibration_phantoms=0)
        info_path = member_dir / "model" / "model.json"
        if info_path.exists():
            info = json.loads(info_path.read_text())
            trained = {key: info["training"].get(key) for key in ("seed", "n_volumes", "steps")}
            if trained != {"seed": config.seed, "n_volumes": n_volumes, "steps": steps}:
                raise ValueError(f"member {k} in {member_dir} was trained with {trained}, not with seed {config.seed}, "
                                 f"{n_volumes} phantoms and {steps} steps: restore the recipe, or delete that "
                                 "folder to train the member again")
            log.info("member %d of %d: already trained (%s)", k, len(config.members), member.model_dir)
        else:
            log.info("member %d of %d: %d phantoms, %d steps", k, len(config.members), n_volumes, steps)
            info = _train_network(member)
        weights.append(torch.load(member_dir / "model" / "calciumnet.pt", map_location="cpu", weights_only=True))
        members.append(_member_record(info, member_dir / "model" / "calciumnet.pt"))
    ensemble = CalciumEnsemble(input_channels(config.input_set), config.widths, len(weights))
    ensemble.load_state_dict({f"members.{k}.{name}": value for k, state in enumerate(weights) for name, value in state.items()})
    return export(ensemble.eval(), config, [], members)


def _initial_network(config: TrainingConfig):
    """A fresh CalciumNet, or the network of ``init_weights`` (a single one or an
    ensemble); with artery-map outputs when the recipe learns the map (fresh ones on
    starting weights, which never hold them)."""
    import torch

    from cacflow.model.network import build_network, ensemble_size, widened_first_layers, with_fresh_artery_heads

    channels = input_channels(config.input_set)
    if not config.init_weights:
        return build_network(channels, config.widths, artery_head=config.learns_arteries)
    state = torch.load(config.init_weights, map_location="cpu", weights_only=True)
    network = build_network(channels, config.widths, ensemble_size(state), config.learns_arteries)
    target = network.state_dict()
    network.load_state_dict(with_fresh_artery_heads(widened_first_layers(state, target), target))
    config.notes["initial_weights_sha256"] = file_sha256(config.init_weights)
    return network


def _train_network(config: TrainingConfig) -> dict:
    network, history = _fit(config)
    return export(network, config, history)


def _checkpoint_recipe(config: TrainingConfig) -> dict:
    """What a checkpoint's steps depend on: resuming one under another recipe would mix
    two runs (or, with fewer steps, pass the old weights off as the new recipe's)."""
    return {"seed": config.seed, "n_volumes": config.n_volumes, "steps": config.steps,
            "batch_size": config.batch_size, "crop": config.crop, "learning_rate": config.learning_rate,
            "widths": list(config.widths), "class_weights": list(config.class_weights),
            **_dataset_recipe(config), "coca_root": bool(config.coca_root),
            **({"artery_loss_weight": config.artery_loss_weight} if config.learns_arteries else {}),
            "initial_weights_sha256": file_sha256(config.init_weights) if config.init_weights else None}


def _fit(config: TrainingConfig):
    """Train one network (or tune an ensemble from ``init_weights``) from its
    checkpoint, if any: (the network on the CPU without its artery-map outputs, its
    loss history)."""
    import torch
    from torch import nn

    from cacflow.model.network import without_artery_heads

    torch.manual_seed(config.seed)
    device = resolve_training_device(config.device)
    device_name = device if device == "cpu" else torch.cuda.get_device_name(0)
    log.info("training on %s", device_name)
    if config.coca_root:
        data_dir = config.data_dir
        n_volumes = build_coca_dataset(config.coca_root, data_dir, config.input_set)
    else:
        data_dir, n_volumes = build_dataset(config), config.n_volumes
    checkpoint_path = Path(config.work_dir) / "checkpoint.pt"
    checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
    network = _initial_network(config)
    if config.coca_root:
        config.notes["training_data"] = f"COCA-format annotations, {n_volumes} patients"
    network.to(device)
    if device == "cuda":  # every batch has the same crop size: let cuDNN pick its fastest kernels once
        torch.backends.cudnn.benchmark = True
    optimiser = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, config.learning_rate, total_steps=config.steps)
    rng = np.random.default_rng([config.seed, 1])
    step, history, trained_on = 0, [], []
    recipe = _checkpoint_recipe(config)
    if checkpoint_path.exists():
        # Loaded onto the CPU and copied into the network and optimiser wherever they
        # are: a run checkpointed on a GPU node resumes on a CPU one and back.
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        if state.get("recipe", recipe) != recipe:  # checkpoints from before the record are taken as they are
            raise ValueError(f"{checkpoint_path} belongs to another recipe ({state['recipe']}, not {recipe}): "
                             f"restore that recipe, or delete {checkpoint_path.parent} to train again")
        network.load_state_dict(state["network"])
        optimiser.load_state_dict(state["optimiser"])
        schedule.load_state_dict(state["schedule"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        step, history, trained_on = state["step"], state["history"], state.get("trained_on", [])
        log.info("resumed from step %d", step)
    if not trained_on or trained_on[-1] != device_name:  # each leg of a resumed run that changed device
        trained_on.append(device_name)
    config.notes["trained_on"] = ", ".join(trained_on)
    sampler = CropSampler(data_dir, n_volumes, config.crop, rng, arteries=config.learns_arteries)
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor(config.class_weights, device=device),
                                  ignore_index=IGNORE_INDEX)
    artery_loss_fn = nn.CrossEntropyLoss(weight=torch.tensor(ARTERY_CLASS_WEIGHTS, device=device),
                                         ignore_index=IGNORE_INDEX)
    network.train()
    started, running = time.perf_counter(), []
    while step < config.steps:
        x, y, *artery_map = (torch.from_numpy(array).to(device) for array in sampler.batch(config.batch_size))
        if config.learns_arteries:
            calcium_logits, artery_logits = network.forward_with_arteries(x.float())
            loss = loss_fn(calcium_logits, y) + config.artery_loss_weight * artery_loss_fn(artery_logits, artery_map[0])
        else:
            loss = loss_fn(network(x.float()), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        step += 1
        running.append(loss.item())
        if step % config.checkpoint_every == 0 or step == config.steps:
            history.append({"step": step, "loss": float(np.mean(running))})
            rate = len(running) / (time.perf_counter() - started)
            log.info("step %d/%d loss %.4f (%.2f steps/s, %.0f s left)", step, config.steps,
                     np.mean(running), rate, (config.steps - step) / rate)
            running, started = [], time.perf_counter()
            tmp = checkpoint_path.with_suffix(".tmp")
            torch.save({"network": network.state_dict(), "optimiser": optimiser.state_dict(),
                        "schedule": schedule.state_dict(), "rng": rng.bit_generator.state,
                        "torch_rng": torch.get_rng_state(), "step": step, "history": history,
                        "trained_on": trained_on, "recipe": recipe}, tmp)
            tmp.replace(checkpoint_path)
    return without_artery_heads(network.to("cpu").eval()), history


# The artery map's class weights (background, LM, LAD, LCX, RCA): the arteries fill
# about 1 % of a crop's pixels, and unweighted they would teach the shared layers
# little beyond "background".
ARTERY_CLASS_WEIGHTS = (1.0, 10.0, 10.0, 10.0, 10.0)


# Recipe options newer than the shipped model.json, recorded only when not their
# default: its bytes, which the workflow hashes to decide whether to infer again, stay
# as they are.
_RECORDED_UNLESS_DEFAULT = {"speck_lesions": False, "input_set": "standard", "artery_loss_weight": 0.0}


def training_record(config: TrainingConfig, ensemble: bool) -> dict:
    """model.json's ``training`` block: the recipe, without paths, devices and what
    has a record of its own (an ensemble's ``n_volumes``/``steps`` are its members')."""
    return {k: v for k, v in asdict(config).items()
            if k not in ("work_dir", "model_dir", "coca_root", "init_weights", "device", "dataset_dir",
                         "int8_calibration_phantoms", "negatives_tune", "review_phantoms",
                         "patch_review_phantoms", "patch_review_min_share", "patch_review_context",
                         "patch_review_scan_types")
            and not (ensemble and k in ("n_volumes", "steps"))
            and not _is_unrecorded_default(k, v)}


def negatives_tune_record(tune: NegativesTune) -> dict:
    """The recipe part of model.json's ``negatives_tune`` block."""
    return {k: v for k, v in asdict(tune).items() if not _is_unrecorded_default(k, v)}


def _is_unrecorded_default(key: str, value) -> bool:
    return key in _RECORDED_UNLESS_DEFAULT and value == _RECORDED_UNLESS_DEFAULT[key]


def export(network, config: TrainingConfig, history: list, members: list | None = None,
           negatives_tune: dict | None = None) -> dict:
    """Write weights, the ONNX graph (checked against PyTorch) and model.json
    (``members``: what each member of an ensemble was trained on; ``negatives_tune``:
    the second stage's record, ``_train_then_tune``)."""
    import torch

    from cacflow.model.network import ensemble_size

    model_dir = Path(config.model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), model_dir / "calciumnet.pt")
    max_error = export_onnx(network, model_dir / "calciumnet.onnx")
    # A COCA fine-tune gets none: its copy would be calibrated and checked on phantoms,
    # not on the real scans it was tuned for; the CPU engine then runs the float graph.
    training = training_record(config, bool(members))
    int8 = _export_int8(model_dir, 0 if config.coca_root else config.int8_calibration_phantoms,
                        _last_stage_stream(training, negatives_tune), config.input_set)
    members_in_network = ensemble_size(network.state_dict())
    info = {
        "model_version": config.model_version,
        "architecture": "CalciumNet 2-D U-Net" + (f", ensemble of {members_in_network}" if members_in_network > 1 else ""),
        "ensemble_size": members_in_network,
        "in_channels": input_channels(config.input_set),
        **input_set_record(config.input_set),
        "widths": list(config.widths),
        "target_spacing_mm": TARGET_SPACING_MM,
        "classes": ["not_coronary", "lm", "lad", "lcx", "rca"],
        "onnx_max_abs_diff_vs_torch": max_error,
        **({"int8": int8} if int8 else {}),
        "training_ranges": _training_ranges(config),
        # Paths stay out: they can name a site or a person. An ensemble's phantoms and
        # steps are its members'.
        "training": training,
        "loss_history": history,
        **({"members": members} if members else {}),
        **({"negatives_tune": negatives_tune} if negatives_tune else {}),
    }
    atomic_write_text(model_dir / "model.json", json.dumps(info, indent=2) + "\n")
    return info


def export_onnx(network, onnx_path: Path) -> float:
    """Write the network's ONNX graph (atomically) and return its largest difference
    from PyTorch on a random batch; over 1e-3 is an error and nothing is written."""
    import onnxruntime as ort
    import torch

    from cacflow.model.network import first_layer_channels

    tmp = onnx_path.with_name(onnx_path.name + ".tmp")
    channels = first_layer_channels(network.state_dict())
    torch.onnx.export(
        network, (torch.randn(2, channels, 6 * SIZE_MULTIPLE, 8 * SIZE_MULTIPLE),), str(tmp), input_names=["inputs"],
        output_names=["logits"],
        dynamic_axes={"inputs": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch", 2: "height", 3: "width"}},
        opset_version=17, dynamo=False,
    )
    check = torch.randn(3, channels, 9 * SIZE_MULTIPLE, 7 * SIZE_MULTIPLE)  # another shape than the traced one
    with torch.inference_mode():
        expected = network(check).numpy()
    got = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"]).run(None, {"inputs": check.numpy()})[0]
    max_error = float(np.abs(got - expected).max())
    if max_error > 1e-3:
        tmp.unlink()
        raise RuntimeError(f"ONNX export disagrees with PyTorch (max |diff| {max_error:.2e})")
    tmp.replace(onnx_path)
    return max_error


def refresh_onnx(model_dir: str | Path, int8_calibration_phantoms: int = CALIBRATION_PHANTOMS) -> float:
    """Export a trained model's ONNX graph and its int8 copy again from its weights
    (calciumnet.pt, which stay as they are) with this version's network code, and record
    the new checks in model.json. For when the graph changes but the weights do not
    (0.3.0's ensemble softmax: README, Performance)."""
    from cacflow.model.engines import ModelFiles

    # The int8 copy is about to be made again: a stale one must not stop the repair.
    model = ModelFiles(Path(model_dir)).checked(check_int8=False)
    max_error = export_onnx(model.build_network(), model.onnx_path)
    info = {key: value for key, value in model.info.items() if key != "int8"}
    atomic_write_text(model.directory / "model.json", json.dumps(dict(info, onnx_max_abs_diff_vs_torch=max_error),
                                                                 indent=2) + "\n")
    refresh_int8(model.directory, int8_calibration_phantoms)
    return max_error


def refresh_int8(model_dir: str | Path, int8_calibration_phantoms: int = CALIBRATION_PHANTOMS) -> dict:
    """Write a trained model's int8 copy of its ONNX graph (again), calibrated on its own
    training stream (model.json's seed and acquisition), and record it in model.json;
    the float graph and the weights stay as they are. How 0.3.0 got its copy
    (docs/evaluation.md). A model whose last stage was the negatives tune is
    calibrated on that stage's phantoms (with its blobs)."""
    model_dir = Path(model_dir)
    info = json.loads((model_dir / "model.json").read_text())
    info.pop("int8", None)
    int8 = _export_int8(model_dir, int8_calibration_phantoms,
                        _last_stage_stream(info.get("training", {}), info.get("negatives_tune")),
                        info.get("input_set", "standard"))
    if int8:
        info["int8"] = int8
    atomic_write_text(model_dir / "model.json", json.dumps(info, indent=2) + "\n")
    return int8


def _last_stage_stream(training: dict, negatives_tune: dict | None) -> dict:
    """The phantom stream a model's last stage trained on, read from its model.json
    record (``training``, ``negatives_tune``): what its int8 copy is calibrated on."""
    if negatives_tune:
        return negatives_tune["phantoms"]
    return training_stream(int(training.get("seed", TrainingConfig.seed)), training.get("acquisition", "standard"),
                           **{option: bool(training.get(option)) for option in STREAM_OPTIONS})


def _export_int8(model_dir: Path, n_calibration: int, stream: dict, input_set: str = "standard") -> dict:
    """The int8 copy of the graph (``cacflow.model.quantization``) and what model.json
    records of it; with no calibration phantoms, none, and no stale copy left behind."""
    from cacflow.model.quantization import export_int8

    if n_calibration <= 0:
        (model_dir / "calciumnet.int8.onnx").unlink(missing_ok=True)
        return {}
    return export_int8(model_dir, n_calibration, stream=stream, input_set=input_set)


def _training_ranges(config: TrainingConfig) -> dict:
    """The acquisition span a model was trained on: its recipe's, or for a COCA
    fine-tune the span of the model it starts from (the real scans' are not known)."""
    if config.coca_root and config.init_weights:
        start = Path(config.init_weights).with_name("model.json")
        ranges = json.loads(start.read_text()).get("training_ranges") if start.exists() else None
        if ranges:
            return ranges
    return {"pixel_spacing_mm": list(training_pixel_spacing_span(config.acquisition))}


def _phantom_scorer(model_dir: str, workers: int, engine: str = "onnxruntime"):
    """phantom -> (its ScanScore, the Agatston range over the model's unsure decisions,
    the voxel labels),
    with the exported ONNX model of ``model_dir`` (loaded once) on ``engine``:
    ``onnxruntime`` (its int8 copy when it has one, as the workflow on a CPU) or
    ``onnxruntime-fp32``."""
    from cacflow.inference import CalciumSegmenter
    from cacflow.model.engines import ModelFiles, create_engine
    from cacflow.qc import scan_type_of
    from cacflow.scoring import agatston_range, score_volume

    model = ModelFiles(Path(model_dir))
    segmenter = CalciumSegmenter.for_model(create_engine(engine, model, threads=workers), model)

    def score(phantom):
        segmentation = segmenter.segment(phantom.hu, phantom.spacing_mm, scan_type=scan_type_of(phantom.metadata["gated"]))
        where = {"z_positions_mm": phantom.z_positions_mm}
        result = score_volume(phantom.hu, segmentation.labels, phantom.spacing_mm, **where)
        return result, agatston_range(phantom.hu, segmentation.labels, segmentation.flipped_labels,
                                      phantom.spacing_mm, **where), segmentation.labels

    score.engine = segmenter.engine.label  # e.g. onnxruntime-cpu-int8: recorded with the figures
    return score


def _range_columns(predicted_range: tuple[float, float]) -> dict:
    from cacflow.scoring import risk_category

    low, high = predicted_range
    return {"range_low": low, "range_high": high, "category_uncertain": risk_category(low) != risk_category(high)}


# Changes to the acquisition of phantoms drawn as for training, for checks beyond the
# training ranges (``holdout_check(..., change=NAME)``). Drawn from their own random
# stream, so a check and its control (same seed) image the same patients.
def _imaged_as(gated: bool, pixel_spacing_mm: tuple[float, float]):
    """A change to gated (cardiac field of view) or non-gated (chest) CT with pixel
    spacing drawn from ``pixel_spacing_mm``."""
    return lambda settings, rng: replace(settings, gated=gated, fov_centre="heart" if gated else "body",
                                         pixel_spacing_mm=float(rng.uniform(*pixel_spacing_mm)))


ACQUISITION_CHANGES = {
    # Thin reconstructions (1.25 mm, contiguous), common in chest CT archives.
    "thin": lambda settings, rng: replace(settings, slice_thickness_mm=1.25, slice_increment_mm=1.25),
    # Non-gated chest CT of a large patient: 440-500 mm field of view (training: up to 0.85 mm).
    "wide_fov": _imaged_as(False, (0.86, 0.98)),
    # Its control: the same patients as non-gated chest CT within the training range.
    "nongated": _imaged_as(False, NONGATED_PIXEL_SPACING_MM),
    # Gated scans at 0.50-0.60 mm, between the gated and the non-gated training spans
    # (512 pixels across 256-307 mm), and their control within the gated span.
    "gated_gap": _imaged_as(True, (0.50, 0.60)),
    "gated": _imaged_as(True, GATED_PIXEL_SPACING_MM),
    # Tube voltages other than 100 and 120 kVp: calcium is brighter at 80, dimmer at 140.
    "kvp_80": lambda settings, rng: replace(settings, kvp=80),
    "kvp_140": lambda settings, rng: replace(settings, kvp=140),
    # Not an acquisition: no planned lesions, only the 1-3 faint, tiny plaques of
    # PhantomSettings.speck_lesions (about 40 % of them score 0), for the speck check.
    "specks": lambda settings, rng: replace(settings, n_coronary_lesions=0, target_agatston=None,
                                            speck_lesions=True),
}


def check_phantom_draws(n_scans: int, seed: int, change: str | None = None) -> list[tuple[int, PhantomSettings]]:
    """(phantom seed, settings) of each scan of a check drawn like the training data
    (validation, hold-out, specks, thin, acquisition checks), in order, with ``change``
    (a key of ``ACQUISITION_CHANGES``) applied: ``generate_phantom(*draw)`` images it."""
    if change is not None and change not in ACQUISITION_CHANGES:
        raise ValueError(f"unknown change {change!r}; choose one of {', '.join(ACQUISITION_CHANGES)}")
    rng = np.random.default_rng(seed)
    change_rng = np.random.default_rng([seed, 1])
    draws = []
    for _ in range(n_scans):
        settings = randomised_phantom_settings(rng)
        if change is not None:
            settings = ACQUISITION_CHANGES[change](settings, change_rng)
        draws.append((int(rng.integers(2**31)), settings))
    return draws


def holdout_check(model_dir: str, n_scans: int = 40, seed: int = 99_000_001, workers: int = 2,
                  change: str | None = None, engine: str = "onnxruntime") -> dict:
    """Score generated scans never used in training (other seeds) with the exported
    ONNX model and compare with their reference scores: risk-category agreement,
    CAC > 0 detection, and the mean absolute Agatston error. ``change`` (a key of
    ``ACQUISITION_CHANGES``) changes every scan's acquisition, e.g. to one the training
    set does not hold, or (``specks``) what its patients hold."""
    from cacflow.synth.phantom import generate_phantom

    draws = check_phantom_draws(n_scans, seed, change)
    score = _phantom_scorer(model_dir, workers, engine)
    rows = []
    for index, (phantom_seed, settings) in enumerate(draws):
        phantom = generate_phantom(phantom_seed, settings)
        predicted, predicted_range, _ = score(phantom)
        rows.append({
            "gated": settings.gated, "slice_thickness_mm": settings.slice_thickness_mm,
            "pixel_spacing_mm": settings.pixel_spacing_mm, "kvp": settings.kvp,
            "reference": phantom.reference["agatston_total"],
            "reference_category": phantom.reference["risk_category"],
            "predicted": predicted.agatston_total, "predicted_category": predicted.risk_category,
            # What the noisy image shows of the same plaques (phantom.image_reference):
            # a secondary reference, at the 130 HU / 1 mm^2 edge where the two differ.
            "image_reference": phantom.reference["image_agatston_total"],
            "image_reference_category": phantom.reference["image_risk_category"],
            **_range_columns(predicted_range),
        })
        # Named by seed and change: validation, hold-out and thin checks all run here.
        log.info("seed %d%s %d/%d: reference %.1f (%s), predicted %.1f (%s)", seed, f" {change}" if change else "",
                 index + 1, n_scans,
                 rows[-1]["reference"], rows[-1]["reference_category"], rows[-1]["predicted"],
                 rows[-1]["predicted_category"])
    return {
        "n_scans": n_scans,
        "seed": seed,
        "engine": score.engine,
        **agreement_summary(rows, "reference"),
        "risk_category_agreement_gated": float(np.mean(
            [r["reference_category"] == r["predicted_category"] for r in rows if r["gated"]] or [np.nan])),
        **{f"{name}_image_reference": value for name, value in agreement_summary(rows, "image_reference").items()},
        **_flag_summary(rows, [r["reference_category"] != r["predicted_category"] for r in rows]),
        "scans": rows,
    }


def agreement_summary(rows: list[dict], reference: str) -> dict:
    """Risk-category agreement, CAC > 0 sensitivity and specificity and the mean
    absolute Agatston error of the predictions against the rows' ``reference`` column
    (its category in ``{reference}_category``)."""
    positives = [r for r in rows if r[reference] > 0]
    negatives = [r for r in rows if r[reference] == 0]
    return {
        "risk_category_agreement": float(np.mean([r[f"{reference}_category"] == r["predicted_category"] for r in rows])),
        "sensitivity_cac_gt_0": float(np.mean([r["predicted"] > 0 for r in positives])) if positives else None,
        "specificity_cac_eq_0": float(np.mean([r["predicted"] == 0 for r in negatives])) if negatives else None,
        "mean_abs_agatston_error": float(np.mean([abs(r["predicted"] - r[reference]) for r in rows])),
    }


def _flag_summary(rows: list[dict], wrong: list[bool]) -> dict:
    """How many scans the unsure-decision range flags for review, and how many of the
    wrong ones (risk category off) are among them."""
    return {
        "scans_flagged_uncertain": sum(r["category_uncertain"] for r in rows),
        "wrong_category_scans": sum(wrong),
        "wrong_category_scans_flagged": sum(w and r["category_uncertain"] for w, r in zip(wrong, rows)),
    }


def noncoronary_check(model_dir: str, n_scans: int = 40, seed: int = 31_000_001, workers: int = 2,
                      engine: str = "onnxruntime") -> dict:
    """Phantoms drawn like the training data but without coronary calcium, each with
    aortic wall, aortic valve or mitral annulus calcium visible (>= 130 HU; bone is in
    every one, each device with probability 0.3): the share the exported model scores
    0 (the issue asks at least 95 %). Phantoms without such calcium are drawn again."""
    from cacflow.synth.cohort import noncoronary_calcium

    score = _phantom_scorer(model_dir, workers, engine)
    rows = []
    drawn = _phantoms_showing(np.random.default_rng(seed), n_scans, noncoronary_calcium,
                              n_coronary_lesions=0, device_probability=0.3)
    for settings, phantom, kinds in drawn:
        predicted, predicted_range, _ = score(phantom)
        devices = sorted({d["kind"] for d in phantom.distractors} & {"stent", "sternal_wires", "pacemaker_lead"})
        rows.append({"gated": settings.gated, "noncoronary_calcium": kinds, "devices": ";".join(devices),
                     "reference": phantom.reference["agatston_total"], "predicted": predicted.agatston_total,
                     **_range_columns(predicted_range)})
        log.info("noncoronary %d/%d: %s%s, predicted %.1f", len(rows), n_scans, kinds,
                 f" + {';'.join(devices)}" if devices else "", predicted.agatston_total)
    return {**_zero_scan_summary(rows, seed, score.engine), "scans": rows}


def _phantoms_showing(rng: np.random.Generator, n_scans: int, kinds_of, **changes):
    """(settings, phantom, kinds) for ``n_scans`` phantoms drawn like the training data
    with ``changes`` to their settings, each showing calcium of the kinds
    ``kinds_of(phantom)`` lists; phantoms showing none are drawn again."""
    from cacflow.synth.phantom import generate_phantom

    found = 0
    while found < n_scans:
        settings = replace(randomised_phantom_settings(rng), **changes)
        phantom = generate_phantom(int(rng.integers(2**31)), settings)
        kinds = kinds_of(phantom)
        if kinds:
            found += 1
            yield settings, phantom, kinds


def _zero_scan_summary(rows: list[dict], seed: int, engine: str) -> dict:
    """Figures of a check on scans without coronary calcium: the share scored 0, all,
    gated and non-gated, and the review flag's counts (every non-zero score is wrong)."""
    zero = [r["predicted"] == 0 for r in rows]
    return {
        "n_scans": len(rows),
        "seed": seed,
        "engine": engine,
        "share_scored_zero": float(np.mean(zero)),
        "share_scored_zero_gated": float(np.mean([z for z, r in zip(zero, rows) if r["gated"]] or [np.nan])),
        "share_scored_zero_nongated": float(np.mean([z for z, r in zip(zero, rows) if not r["gated"]] or [np.nan])),
        **_flag_summary(rows, [not z for z in zero]),
    }


def unfamiliar_calcium_check(model_dir: str, n_scans: int = 40, seed: int = 41_000_001, workers: int = 2,
                             engine: str = "onnxruntime") -> dict:
    """Like ``noncoronary_check``, with calcium of kinds the network's training phantoms
    never hold (``UNFAMILIAR_CALCIUM_KINDS``: lung granulomas, hilar lymph nodes, costal
    cartilage, breast arteries; only a patch review's optional fourth stream does)
    beside the usual distractors, and no coronary calcium:
    the share scored 0, and for each scan scored above 0 the kinds of calcium the
    model called coronary. How a model trained on a simulator meets calcium it has not
    learnt, as it will in real chest CT. Phantoms without such calcium visible are
    drawn again."""
    from cacflow.synth.phantom import UNFAMILIAR_CALCIUM_KINDS

    def visible_unfamiliar_kinds(phantom) -> list[str]:
        return sorted({d["kind"] for d in phantom.distractors
                       if d["kind"] in UNFAMILIAR_CALCIUM_KINDS and d["agatston_if_scored"] > 0})

    score = _phantom_scorer(model_dir, workers, engine)
    rows = []
    drawn = _phantoms_showing(np.random.default_rng(seed), n_scans, visible_unfamiliar_kinds,
                              n_coronary_lesions=0, unfamiliar_calcium=True)
    for settings, phantom, kinds in drawn:
        predicted, predicted_range, labels = score(phantom)
        rows.append({"gated": settings.gated, "unfamiliar_calcium": ";".join(kinds),
                     "reference": phantom.reference["agatston_total"], "predicted": predicted.agatston_total,
                     "called_coronary": ";".join(_called_coronary(phantom, labels) if predicted.agatston_total > 0
                                                 else []),
                     **_range_columns(predicted_range)})
        log.info("unfamiliar %d/%d: %s, predicted %.1f %s", len(rows), n_scans, rows[-1]["unfamiliar_calcium"],
                 predicted.agatston_total, rows[-1]["called_coronary"])
    called = [kind for r in rows for kind in r["called_coronary"].split(";") if kind]
    return {
        **_zero_scan_summary(rows, seed, score.engine),
        "scans_with_kind": {k: sum(k in r["unfamiliar_calcium"].split(";") for r in rows)
                            for k in UNFAMILIAR_CALCIUM_KINDS},
        "scans_calling_kind_coronary": {k: called.count(k) for k in sorted(set(called))},
        "scans": rows,
    }


def _called_coronary(phantom, labels: np.ndarray) -> list[str]:
    """The kinds of the generated calcified objects that the model labelled coronary.
    Each labelled in-slice component goes to the object nearest its centroid (distance
    to the object's centre less its largest semi-axis), among those within 2 mm of that
    reach in-plane and, along z, within half a slice more; else to ``other`` (bone,
    noise, devices)."""
    from scipy import ndimage

    from cacflow.inference import IN_PLANE_8_CONNECTED

    components, n = ndimage.label(labels > 0, structure=IN_PLANE_8_CONNECTED)
    if n == 0:
        return []
    _, row_mm, col_mm = phantom.spacing_mm
    objects = [d for d in phantom.distractors if "centre_zyx_mm" in d]
    centres = np.array([d["centre_zyx_mm"] for d in objects]).reshape(-1, 3)
    reach = np.array([max(d["semi_axes_mm"]) for d in objects])
    found = set()
    for z, y, x in ndimage.center_of_mass(labels > 0, components, range(1, n + 1)):
        point = np.array([np.interp(z, np.arange(len(phantom.z_positions_mm)), phantom.z_positions_mm),
                          phantom.origin_xy_mm[1] + y * row_mm, phantom.origin_xy_mm[0] + x * col_mm])
        offset = np.abs(point - centres)
        within = ((np.hypot(offset[:, 1], offset[:, 2]) <= reach + 2.0)
                  & (offset[:, 0] <= reach + 2.0 + phantom.slice_thickness_mm / 2))
        gap = np.linalg.norm(offset, axis=1) - reach
        found.add(objects[int(np.argmin(np.where(within, gap, np.inf)))]["kind"] if within.any() else "other")
    return sorted(found)
