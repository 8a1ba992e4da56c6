import logging

import pytest
import yaml

from cacflow.cli import build_parser, main
from cacflow.config import load_config
from cacflow.progress import Progress


def test_shipped_config_is_valid_and_has_the_defaults():
    config = load_config()
    assert config["manifest"] == "demo" and config["engine"] == "auto"
    assert config["scoring"]["threshold_hu"] == 130


def test_a_misspelt_key_stops_with_its_name(tmp_path):
    user = tmp_path / "bad.yaml"
    user.write_text(yaml.safe_dump({"enigne": "torch"}))
    with pytest.raises(SystemExit, match="enigne"):
        load_config(user)


def test_a_bad_value_names_where_it_is(tmp_path):
    user = tmp_path / "bad.yaml"
    user.write_text(yaml.safe_dump({"shard_size": 0}))
    with pytest.raises(SystemExit, match="shard_size"):
        load_config(user)


def test_every_command_is_registered():
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    assert {"synth", "score-scan", "agatston", "calibrate", "coca-reference", "train", "stage", "evaluate"} <= commands


def test_version_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert "cacflow" in capsys.readouterr().out


def test_progress_reports_count_rate_and_time_left(caplog):
    logger = logging.getLogger("test.progress")
    with caplog.at_level(logging.INFO, logger="test.progress"):
        progress = Progress("infer", 3, logger, every_s=0.0)
        for _ in range(3):
            progress.step()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "infer: 3 to process"
    assert lines[-1].startswith("infer: 3/3 done (") and "/s, about 0 s left)" in lines[-1]
