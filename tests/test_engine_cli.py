"""``python -m training train``: exit codes and messages for config and setup mistakes; the failure record."""

from __future__ import annotations

import json
import logging

from training.__main__ import main
from training.run.events import read_status


def test_missing_config_is_exit_code_2(tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        assert main(["train", "--config", str(tmp_path / "nope.json")]) == 2
    assert "does not exist" in caplog.text


def test_unknown_key_is_exit_code_2(tmp_path, caplog):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"run": {"output_dir": str(tmp_path / "run"), "stepz": 3}}))
    with caplog.at_level(logging.ERROR):
        assert main(["train", "--config", str(path)]) == 2
    assert "stepz" in caplog.text


def test_setup_mistake_fails_the_run_with_the_fix(tmp_path, caplog):
    """Shards without the empty caption's features while caption dropout is on: status 'failed' naming the fix."""
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text("{}")
    path = tmp_path / "config.json"
    config = {
        "run": {"output_dir": str(tmp_path / "run"), "steps": 1},
        "model": {"preset": "tiny", "dtype": "fp32"},
        "data": {"shards": str(shards), "caption_dropout": 0.1},
    }
    path.write_text(json.dumps(config))
    with caplog.at_level(logging.ERROR):
        assert main(["train", "--config", str(path)]) == 2
    status = read_status(tmp_path / "run")
    assert status["state"] == "failed"
    assert "empty caption" in status["message"] and "caption_dropout to 0" in status["message"], status
