"""The workflow configuration outside Snakemake (``score-scan`` and friends):
the shipped defaults, optionally overlaid by a user's file, checked against the
same JSON schema the workflow uses."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import yaml


def _config_dir() -> Path:
    """config/ of the source checkout cacflow is installed from (pip install -e .)."""
    checkout = Path(__file__).resolve().parents[2] / "config"
    if not (checkout / "config.yaml").is_file():
        raise SystemExit(f"cacflow's config/ folder was not found at {checkout}; install with `pip install -e .` "
                         "from a clone of the repository")
    return checkout


def load_config(user_file: str | Path | None = None) -> dict:
    directory = _config_dir()
    config = yaml.safe_load((directory / "config.yaml").read_text())
    if user_file:
        config.update(yaml.safe_load(Path(user_file).read_text()) or {})
    schema = yaml.safe_load((directory / "schema" / "config.schema.yaml").read_text())
    try:
        jsonschema.validate(config, schema)
    except jsonschema.ValidationError as error:
        where = "/".join(str(part) for part in error.absolute_path) or "(top level)"
        raise SystemExit(f"invalid configuration at {where}: {error.message}") from None
    return config


def check_model(config: dict, command: str) -> None:
    """Stop with the reason, before any scan is read, unless the config's ``model`` (a
    folder relative to the current directory; empty: the shipped model) can run."""
    from cacflow.model.engines import ModelFiles

    try:
        ModelFiles.chosen(config.get("model"))
    except ValueError as error:  # a wrong folder is a usage error, not a crash
        raise SystemExit(f"cacflow {command}: {error}") from None
