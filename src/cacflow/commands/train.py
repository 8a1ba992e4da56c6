"""``cacflow train``: train CalciumNet on generated phantoms (seeded, resumable)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

NAME = "train"
HELP = "train the coronary calcium network on generated phantoms (resumes from checkpoints)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work-dir", type=Path, required=True, help="dataset cache and checkpoints")
    parser.add_argument("--model-dir", type=Path, required=True, help="where the trained model is written")
    parser.add_argument("--volumes", type=int, default=200, help="generated training volumes")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=20261126)
    parser.add_argument("--workers", type=int, default=2, help="processes generating phantoms")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from cacflow.training import TrainingConfig, train

    config = TrainingConfig(
        work_dir=str(args.work_dir), model_dir=str(args.model_dir), seed=args.seed,
        n_volumes=args.volumes, steps=args.steps, workers=args.workers,
    )
    info = train(config)
    logging.getLogger("cacflow.train").info("model %s written to %s", info["model_version"], args.model_dir)
    return 0
