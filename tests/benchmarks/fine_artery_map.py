"""The eighteenth candidate's artery map at the image's own resolution
(docs/evaluation.md, "A full-resolution artery map on unsure candidates of quiet scans").

    python tests/benchmarks/fine_artery_map.py data  --out work18/data          # 300 phantoms, ~11 min on 2 cores
    python tests/benchmarks/fine_artery_map.py train --data work18/data --out work18/fine_artery.pt

The map is a small U-Net that takes a 48 x 48 mm patch resampled to 0.5 mm pixels (the
candidate's slice and its two neighbours, HU) and says for every pixel whether it lies
on a coronary artery: the generator's tube (lumen and wall) or a plaque on it. A
candidate's share is the map's mean over its pixels. ``quiet_scan_rule.py
--fine-artery-map`` tables it beside the other shares.

Data: phantoms of their own training stream (seed 180000001, drawn as the training
phantoms, with scattered and perivascular calcium, every second one with faint specks);
per phantom up to 30 patches centred (within a few pixels) on calcium candidates within
20 mm of an artery, coronary or not, 10 on random artery pixels and 6 at random in the
arteries' box. Phantoms 280-299 are held out to watch the fit.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from scipy import ndimage

PATCH = 96
PIXEL_MM = 0.5
STREAM_SEED = 180_000_001
N_PHANTOMS, HELD_OUT = 300, 20


def _sample_grid(center_yx, pixel_mm: float):
    """Source-pixel coordinates of the patch's 0.5 mm grid centred on ``center_yx``."""
    offsets = (np.arange(PATCH) - (PATCH - 1) / 2) * PIXEL_MM / pixel_mm
    return np.meshgrid(center_yx[0] + offsets, center_yx[1] + offsets, indexing="ij")


def image_patch(hu: np.ndarray, z: int, center_yx, pixel_mm: float) -> np.ndarray:
    """float32 [3, PATCH, PATCH]: HU of slices z-1, z, z+1 (clamped at the ends), linear;
    outside the image, air."""
    rows, cols = _sample_grid(center_yx, pixel_mm)
    out = np.empty((3, PATCH, PATCH), np.float32)
    for channel, dz in enumerate((-1, 0, 1)):
        source = hu[min(max(z + dz, 0), hu.shape[0] - 1)]
        out[channel] = ndimage.map_coordinates(source, [rows, cols], order=1, cval=-1000.0)
    return out


def mask_patch(mask: np.ndarray, center_yx, pixel_mm: float) -> np.ndarray:
    """bool [PATCH, PATCH]: a slice's mask on the patch grid (nearest pixel)."""
    rows, cols = _sample_grid(center_yx, pixel_mm)
    return ndimage.map_coordinates(mask.astype(np.float32), [rows, cols], order=0, cval=0.0) > 0.5


def normalise(patch: np.ndarray) -> np.ndarray:
    return np.clip((patch + 200.0) / 600.0, -0.5, 2.0).astype(np.float32)


def training_patches(phantom, rng: np.random.Generator, n_calcium: int = 30, n_artery: int = 10, n_heart: int = 6):
    """(images [n, 3, P, P] float16, on-artery targets [n, P, P], calcium [n, P, P]) of
    one phantom, or None when it has no artery."""
    from cacflow.inference import IN_PLANE_8_CONNECTED

    hu, pixel = phantom.hu, phantom.spacing_mm[1]
    artery = (phantom.vessel_labels > 0) | (phantom.coronary_labels > 0)
    calcium = hu >= 130.0
    components, count = ndimage.label(calcium, structure=IN_PLANE_8_CONNECTED)
    centers = []
    if count:
        near = ndimage.binary_dilation(artery, structure=np.ones((1, 3, 3), bool), iterations=int(round(20.0 / pixel)))
        numbers = np.arange(1, count + 1)
        centres_of_mass = ndimage.center_of_mass(calcium, components, numbers)
        sizes = ndimage.sum(calcium, components, numbers)
        keep = [i for i, (c, size) in enumerate(zip(centres_of_mass, sizes)) if size * pixel * pixel >= 0.5
                and near[int(round(c[0])), int(round(c[1])), int(round(c[2]))]]
        rng.shuffle(keep)
        centers += [centres_of_mass[i] for i in keep[:n_calcium]]
    zs, ys, xs = np.nonzero(artery)
    if len(zs) == 0:
        return None
    pick = rng.choice(len(zs), size=min(n_artery, len(zs)), replace=False)
    centers += [(zs[i], ys[i], xs[i]) for i in pick]
    low, high = np.array([zs.min(), ys.min(), xs.min()]), np.array([zs.max(), ys.max(), xs.max()])
    centers += [tuple(rng.uniform(low, high)) for _ in range(n_heart)]
    images, targets, calcified = [], [], []
    for c in centers:
        z = int(round(c[0]))
        yx = (float(c[1]) + rng.uniform(-4, 4), float(c[2]) + rng.uniform(-4, 4))
        images.append(normalise(image_patch(hu, z, yx, pixel)))
        targets.append(mask_patch(artery[z], yx, pixel))
        calcified.append(mask_patch(calcium[z], yx, pixel))
    return np.stack(images).astype(np.float16), np.stack(targets), np.stack(calcified)


def _make_one(job) -> tuple[int, int]:
    from cacflow.training import training_phantom

    index, out = job
    phantom = training_phantom(STREAM_SEED, index, scattered_calcium=True, perivascular_calcium=True,
                               speck_lesions=index % 2 == 1)
    patches = training_patches(phantom, np.random.default_rng([STREAM_SEED, index, 7]))
    if patches is None:
        return index, 0
    np.savez_compressed(Path(out) / f"{index:04d}.npz", images=patches[0], targets=patches[1], calcium=patches[2])
    return index, len(patches[0])


def network(widths=(8, 16, 32)):
    import torch
    from torch import nn
    from torch.nn import functional as F

    def block(a, b):
        return nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(inplace=True),
                             nn.Conv2d(b, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(inplace=True))

    class FineArteryNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.e1, self.e2, self.e3 = block(3, widths[0]), block(widths[0], widths[1]), block(widths[1], widths[2])
            self.d2, self.d1 = block(widths[2] + widths[1], widths[1]), block(widths[1] + widths[0], widths[0])
            self.head = nn.Conv2d(widths[0], 1, 1)

        def forward(self, x):
            a = self.e1(x)
            b = self.e2(F.max_pool2d(a, 2))
            c = self.e3(F.max_pool2d(b, 2))
            b = self.d2(torch.cat([b, F.interpolate(c, scale_factor=2.0)], 1))
            a = self.d1(torch.cat([a, F.interpolate(b, scale_factor=2.0)], 1))
            return self.head(a)[:, 0]

    return FineArteryNet()


def load_map(weights: Path):
    import torch

    net = network()
    net.load_state_dict(torch.load(weights, map_location="cpu"))
    return net.eval()


def fine_artery_shares(net, hu: np.ndarray, components: np.ndarray, numbers, pixel_mm: float) -> list[float]:
    """Each candidate's (component ``numbers`` of the in-slice ``components``) mean map
    probability over its pixels, the patch centred on its centre of mass."""
    import torch

    if len(numbers) == 0:
        return []
    boxes = ndimage.find_objects(components)
    patches, masks = [], []
    for k in numbers:
        z = boxes[k - 1][0].start
        own = components[z] == k
        centre = ndimage.center_of_mass(own)
        patches.append(normalise(image_patch(hu, z, centre, pixel_mm)))
        masks.append(mask_patch(own, centre, pixel_mm))
    with torch.no_grad():
        probabilities = torch.sigmoid(net(torch.from_numpy(np.stack(patches)))).numpy()
    return [float(p[m].mean()) if m.any() else float("nan") for p, m in zip(probabilities, masks)]


def _load(folder: Path, indices):
    parts = [np.load(folder / f"{i:04d}.npz") for i in indices if (folder / f"{i:04d}.npz").exists()]
    return tuple(np.concatenate([p[key] for p in parts]) for key in ("images", "targets", "calcium"))


def train(data: Path, out: Path, steps: int = 3000, batch: int = 32) -> None:
    """Cross-entropy weighted 3 on artery pixels and 5 on calcium pixels; seed 18. Prints
    the held-out phantoms' IoU and calcium-pixel calls every 200 steps."""
    import torch
    from torch.nn import functional as F

    torch.manual_seed(18)
    images, targets, calcium = _load(data, range(N_PHANTOMS - HELD_OUT))
    held_images, held_targets, held_calcium = _load(data, range(N_PHANTOMS - HELD_OUT, N_PHANTOMS))
    net = network()
    optimiser = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(18)
    started = time.time()
    for step in range(1, steps + 1):
        net.train()
        pick = rng.integers(len(images), size=batch)
        weights = torch.from_numpy((1.0 + 2.0 * targets[pick] + 4.0 * calcium[pick]).astype(np.float32))
        logits = net(torch.from_numpy(images[pick].astype(np.float32)))
        loss = (F.binary_cross_entropy_with_logits(logits, torch.from_numpy(targets[pick].astype(np.float32)),
                                                   reduction="none") * weights).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 200 == 0 or step == steps:
            net.eval()
            with torch.no_grad():
                p = torch.cat([torch.sigmoid(net(torch.from_numpy(held_images[i:i + 64].astype(np.float32))))
                               for i in range(0, len(held_images), 64)]).numpy()
            called = p >= 0.5
            on, off = called[held_calcium & held_targets], called[held_calcium & ~held_targets]
            print(json.dumps({"step": step, "loss": round(float(loss.detach()), 4),
                              "held_out_iou": round(float((called & held_targets).sum() / max((called | held_targets).sum(), 1)), 3),
                              "calcium_on_artery_called": round(float(on.mean()), 3) if on.size else None,
                              "calcium_off_artery_called": round(float(off.mean()), 4) if off.size else None,
                              "seconds": round(time.time() - started)}), flush=True)
            torch.save(net.state_dict(), out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("data", "train"))
    parser.add_argument("--data", type=Path, help="train: the folder `data` wrote")
    parser.add_argument("--out", type=Path, required=True, help="data: a folder; train: the weights file")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    if args.command == "data":
        args.out.mkdir(parents=True, exist_ok=True)
        jobs = [(i, str(args.out)) for i in range(N_PHANTOMS) if not (args.out / f"{i:04d}.npz").exists()]
        with ProcessPoolExecutor(args.workers) as pool:
            for index, n in pool.map(_make_one, jobs):
                print(index, n, flush=True)
    else:
        train(args.data, args.out)


if __name__ == "__main__":
    main()
