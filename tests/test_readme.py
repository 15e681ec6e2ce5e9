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


def test_get_the_models_names_the_files_the_workflows_declare():
    from tools.workflow_graph import MODEL_FILES

    section = README[README.index("## Get the models") : README.index("## Try it without the models")]
    for name, (folder, url) in MODEL_FILES.items():
        row = next(line for line in section.splitlines() if f"`{name}`" in line)
        assert f"`ComfyUI/models/{folder}/`" in row and f"({url})" in row, row


def test_smallest_config_is_labelled_as_the_80gb_plan_and_matches_it():
    from tools.make_workflows import JOBS, plan_for
    from training.hardware.tiers import load_tiers

    intro = README[README.index("The smallest useful one") :]
    assert intro.index("80 GB") < intro.index("```json")
    config = json.loads(re.findall(r"```json\n(.*?)```", README, re.DOTALL)[0])
    plan = plan_for(load_tiers()["1x80GB"], JOBS["1x80GB"])
    run = config["run"]
    assert (run["micro_batch"], run["checkpoint_depth"], run["compile"]) == (
        plan.micro_batch,
        plan.checkpoint_depth,
        plan.compile,
    )
    assert config["lora"]["rank"] == plan.lora_rank


def test_try_it_without_the_models_commands_exist():
    assert "python -m tools.make_smoke_model ComfyUI/models/diffusion_models" in README
    assert (REPO / "tools" / "make_smoke_model.py").is_file()
    from tools.make_workflows import SMOKE_MODEL

    assert f"`{SMOKE_MODEL}`" in README
