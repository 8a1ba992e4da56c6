"""Generated phantoms written in the COCA gated layout, so the COCA route
(``cacflow coca-reference``, fine-tuning with ``cacflow train --coca-root``) can
be tried and tested without the research-use-only COCA data.

Layout (as the Stanford AIMI COCA gated release, see ``cacflow.coca``):
``patient/<id>/<series>/IM-*.dcm`` and ``calcium_xml/<id>.xml``, an OsiriX ROI
export (Apple plist) with one polygon per coronary lesion and slice, named by
artery. A reader draws a polygon around each calcification; here it is the
outline of the lesion's pixels (the union of their pixel squares, traced as
one polygon per 8-connected group), so rasterising it with the pixel-centre
rule gives back exactly the lesion's pixels.
"""

from __future__ import annotations

import plistlib
from pathlib import Path

import numpy as np
from scipy import ndimage

from cacflow.synth.dicom_writer import write_series
from cacflow.synth.phantom import Phantom

ROI_NAME_BY_LABEL = {
    1: "Left Coronary Artery",
    2: "Left Anterior Descending Artery",
    3: "Left Circumflex Artery",
    4: "Right Coronary Artery",
}
SERIES_FOLDER = "Pro_Gated_CS_3.0_I30f_3_70%"  # a COCA-like series folder name


def write_coca_patient(phantom: Phantom, root: str | Path, coca_id: str, uids: dict) -> Path:
    """Write one patient: its DICOM series and its calcium XML. Returns the XML path."""
    root = Path(root)
    write_series(phantom, root / "patient" / coca_id / SERIES_FOLDER, series_kind="calcium_score", uids=uids,
                 naming="IM")
    images = []
    for z in range(phantom.coronary_labels.shape[0]):
        rois = []
        for label, name in ROI_NAME_BY_LABEL.items():
            mask = phantom.coronary_labels[z] == label
            components, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
            for index in range(1, n + 1):
                for outline in pixel_outlines(components == index):
                    rois.append(_roi(name, outline, float(phantom.z_positions_mm[z]), phantom))
        if rois:
            images.append({"ImageIndex": z, "NumberOfROIs": len(rois), "ROIs": rois})
    xml_path = root / "calcium_xml" / f"{coca_id}.xml"
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    with open(xml_path, "wb") as handle:
        plistlib.dump({"Images": images}, handle, fmt=plistlib.FMT_XML)
    return xml_path


def _roi(name: str, outline: np.ndarray, z_mm: float, phantom: Phantom) -> dict:
    x0, y0 = phantom.origin_xy_mm
    row_mm, col_mm = phantom.spacing_mm[1], phantom.spacing_mm[2]
    return {
        "Name": name,
        "Point_px": [f"({x:.3f}, {y:.3f})" for x, y in outline],
        "Point_mm": [f"({x0 + x * col_mm:.3f}, {y0 + y * row_mm:.3f}, {z_mm:.3f})" for x, y in outline],
    }


def pixel_outlines(mask: np.ndarray) -> list[np.ndarray]:
    """Closed polygons (x = column, y = row; pixel centres at integers) whose insides
    hold exactly the pixel centres of ``mask``: the boundary edges of the pixels'
    unit squares, chained into loops. A loop inside another (a hole) is returned
    too; the even-odd rule then excludes the hole, as it should."""
    edges: dict[tuple, list[tuple]] = {}

    def add(a, b):
        edges.setdefault(a, []).append(b)

    rows, cols = np.nonzero(mask)
    padded = np.pad(mask, 1)
    for r, c in zip(rows.tolist(), cols.tolist()):
        top, bottom, left, right = r - 0.5, r + 0.5, c - 0.5, c + 0.5
        # Clockwise on screen (y down); an edge is on the boundary when the
        # neighbour across it is outside the mask.
        if not padded[r, c + 1]:
            add((left, top), (right, top))
        if not padded[r + 1, c + 2]:
            add((right, top), (right, bottom))
        if not padded[r + 2, c + 1]:
            add((right, bottom), (left, bottom))
        if not padded[r + 1, c]:
            add((left, bottom), (left, top))
    loops = []
    while edges:
        start = next(iter(edges))
        loop, point = [start], start
        while True:
            following = edges[point].pop()
            if not edges[point]:
                del edges[point]
            if following == start:
                break
            loop.append(following)
            point = following
        loops.append(np.array(loop, dtype=np.float64))
    return loops
