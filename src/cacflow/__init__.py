"""cacflow: coronary artery calcium scoring for CT cohorts."""

__version__ = "0.1.0"

# Label values used everywhere (inference output, COCA rasterisation, scoring).
VESSEL_LABELS = {1: "lm", 2: "lad", 3: "lcx", 4: "rca"}
VESSEL_NAMES = tuple(VESSEL_LABELS.values())
