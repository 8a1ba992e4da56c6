"""The pixel noise of a CT volume: the standard deviation of one pixel's HU about its
true value, as it decides how often noise alone lifts a small group of pixels over
Agatston's 130 HU.

Measured where the anatomy is flat: in a window of about ``WINDOW_MM`` around each
soft-tissue pixel the HU spread is the noise, and the median over all such windows
ignores the few that straddle an edge. The window must be wider than the noise's
grain (0.3-0.8 mm in CT kernels) so that correlated noise is counted in full, and
narrower than a heart chamber, so that it fits inside one. Differences of neighbouring
pixels (``candidate_review.scan_noise_hu``) cancel correlated noise instead: on
generated scans they read 0.5-0.9 of the true value, this 0.99-1.03
(docs/evaluation.md, "The artery map on unsure candidates of quiet scans only").
Noise as coarse as the softest kernels at the finest pixels (0.8 mm grain, 0.3 mm
pixels) reads about 5 % low: the window's mean takes some of it.

On real scans anatomy's own texture adds to the spread, so there the estimate errs
high.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

WINDOW_MM = 5.0
MIN_WINDOW_PIXELS = 5
# A window is soft tissue (fat-free muscle, blood, myocardium, liver) when its mean lies
# here; the pixel itself must not be lung or air, which would make the window an edge.
SOFT_TISSUE_MEAN_HU = (-20.0, 100.0)
MIN_PIXEL_HU = -200.0
SLICE_STEP = 4  # every 4th slice is plenty for a median over a whole scan
MIN_SOFT_TISSUE_PIXELS = 1000


def pixel_noise_hu(hu: np.ndarray, pixel_spacing_mm: float) -> float | None:
    """The median local HU standard deviation over the soft tissue of ``hu[z, y, x]``
    (square in-plane pixels of ``pixel_spacing_mm``), or None when the volume holds too
    little soft tissue to say."""
    sample = np.asarray(hu[::SLICE_STEP], dtype=np.float32)
    width = max(MIN_WINDOW_PIXELS, int(round(WINDOW_MM / pixel_spacing_mm)) | 1)  # odd: centred on the pixel
    mean = ndimage.uniform_filter(sample, (1, width, width))
    mean_of_squares = ndimage.uniform_filter(sample * sample, (1, width, width))
    spread = np.sqrt(np.maximum(mean_of_squares - mean * mean, 0.0))
    low, high = SOFT_TISSUE_MEAN_HU
    soft = (mean > low) & (mean < high) & (sample > MIN_PIXEL_HU)
    if np.count_nonzero(soft) < MIN_SOFT_TISSUE_PIXELS:
        return None
    return float(np.median(spread[soft]))
