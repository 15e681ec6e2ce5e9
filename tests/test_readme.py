"""The README's examples stay true: its run config validates, and CI runs exactly the README's test command."""

from __future__ import annotations

import json
import re
from pathlib import Path

from training.engine.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def test_readme_run_config_is_a_valid_config():
    blocks = re.findall(r"```json\n(.*?)```", README, re.DOTALL)
    assert blocks, "the README shows a run config"
    for block in blocks:
        config = TrainConfig.from_dict(json.loads(block))
        assert config.mode in ("lora", "qlora", "full")


def test_ci_runs_the_readme_test_command():
    setup, test = "bash scripts/setup.sh --test", ".venv/bin/python -m pytest"
    assert f"{setup} && {test}" in README
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert setup in ci and test in ci
