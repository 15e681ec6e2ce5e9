"""`plan --resolution-schedule`: every shape of a multi-resolution shard set planned from the CLI, and the config's
`resolutions` section written with the planner's micro-batch per resolution (issue 22)."""

from __future__ import annotations

import json

from tests.data_fixtures import make_dataset
from training.__main__ import main as cli_main
from training.data.encoders import TestLatentEncoder, TestTextEncoder
from training.data.pack import PackConfig, pack_dataset
from training.engine.config import TrainConfig

SIZES = ((160, 160), (192, 128), (128, 192))


def packed(tmp_path):
    make_dataset(tmp_path / "in", 6, sizes=SIZES)
    config = PackConfig(input_dir=tmp_path / "in", output_dir=tmp_path / "shards", resolution=(64, 128))
    pack_dataset(config, latent_encoder=TestLatentEncoder(), text_encoder=TestTextEncoder())
    return tmp_path / "shards"


def test_a_progressive_schedule_is_planned_per_shape_and_written(tmp_path, capsys):
    shards = packed(tmp_path)
    config_path = tmp_path / "run" / "config.json"
    argv = ["plan", "--tier", "cpu", "--model", "tiny", "--rank", "4", "--batch", "4", "--shards", str(shards)]
    schedule = ["--resolution-schedule", "progressive", "--resolution-stages", "64=0.5,128=1.0"]
    assert cli_main([*argv, *schedule, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    planned = {(s["resolution"], tuple(s["shape"])) for s in printed["shapes"]}
    assert {r for r, _ in planned} == {64, 128} and len(planned) >= 3  # every bucket of both resolutions
    assert cli_main([*argv, *schedule, "--write-config", str(config_path), "--steps", "6"]) == 0
    config = TrainConfig.load(config_path)
    section = config.resolutions
    assert section.schedule == "progressive" and section.stages == ((64, 0.5), (128, 1.0))
    per_rank = config.run.micro_batch * config.run.grad_accum
    for resolution in ("64", "128"):
        assert section.micro_batch[resolution] * section.grad_accum[resolution] == per_rank
    assert section.micro_batch["64"] >= section.micro_batch["128"]  # the smaller shape fits at least as many


def test_schedule_mistakes_exit_2_naming_the_flag(tmp_path, caplog):
    shards = packed(tmp_path)
    argv = ["plan", "--tier", "cpu", "--model", "tiny", "--rank", "4", "--shards", str(shards)]
    assert cli_main([*argv, "--resolution-schedule", "mix", "--resolution-weights", "64=1,256=1"]) == 2
    assert cli_main([*argv, "--resolution-schedule", "mix", "--resolution-weights", "64:1"]) == 2
    assert cli_main([*argv, "--resolution-schedule", "progressive", "--resolution-stages", ""]) == 2
    assert cli_main(["plan", "--tier", "cpu", "--resolution-schedule", "mix", "--resolution-weights", "64=1"]) == 2
    errors = caplog.text
    assert "256 px, which" in errors and "RES=NUMBER" in errors and "needs --shards" in errors
