"""Every CLI error is one line naming the input and the fix, exit code 2, no traceback; a bug is exit code 1 with the
traceback in a log file whose path is printed. Called through `training.__main__.main` with stderr captured."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import re
import tempfile
from pathlib import Path

import pytest
from test_engine_runs import tiny_config

import training.atomic as atomic_module
import training.data.shards as shards_module
from tests.data_fixtures import make_dataset
from training.__main__ import build_parser, main
from training.run.events import read_status


def run(argv: list[str], capsys, caplog=None) -> tuple[int, str]:
    """(exit code, what stderr shows) of ``python -m training <argv>``; argparse errors exit through SystemExit.
    With ``caplog``, ERROR log records count as stderr lines too (the CLI's logging writes them there)."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    if caplog is not None:
        err += "".join(f"{r.getMessage()}\n" for r in caplog.records if r.levelno >= logging.ERROR)
        caplog.clear()
    return code, err


def assert_one_message(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if not re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ", line)]
    assert "Traceback" not in err, err
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


class FullDiskFile(io.FileIO):
    """A file on a disk with ``room`` bytes left: the write that passes it fails with ENOSPC, as the OS would."""

    def __init__(self, path, mode, room: int) -> None:
        super().__init__(path, mode.replace("b", ""))
        self.room = room
        self.path = path

    def write(self, data) -> int:
        self.room -= len(data)
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        return super().write(data)


def full_disk_open(room: int, *, only: str = ""):
    """`open` for a module under test: files written whose path contains ``only`` are on the full disk."""

    def fake_open(path, mode="r", *args, **kwargs):
        if "b" in mode and any(c in mode for c in "wxa") and only in str(path):
            return FullDiskFile(path, mode, room)
        return open(path, mode, *args, **kwargs)

    return fake_open


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--tier", "cpu", "--rank", "0"], ["--rank: 0 is out of range", "1..1024"]),
        (["--tier", "cpu", "--rank", "x"], ["--rank", "'x'"]),
        (["--tier", "cpu", "--batch", "0"], ["--batch: 0 is out of range"]),
        (["--tier", "cpu", "--lr", "nan"], ["--lr: nan is out of range", "finite number above 0"]),
        (["--tier", "cpu", "--lr", "1e30"], ["--lr: 1e30 is out of range"]),
        (["--tier", "cpu", "--resolution", "500"], ["--resolution: 500 is not a multiple of 16", "496 or 512"]),
        (["--tier", "cpu", "--resolution", "0"], ["--resolution: 0 is out of range"]),
    ],
)
def test_plan_flag_mistakes(flags, needles, capsys):
    code, err = run(["plan", *flags], capsys)
    assert code == 2
    assert_one_message(err, *needles)


def test_plan_unknown_tier(capsys, caplog):
    """The plan command reports its own mistakes through logging: one ERROR line, exit code 2, no traceback."""
    with caplog.at_level(logging.ERROR):
        code, err = run(["plan", "--tier", "nope"], capsys)
    assert code == 2 and "Traceback" not in err + caplog.text
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "plan: --tier 'nope' is not a known tier: choose one of "
        "1x12GB, 1x16GB, 1x24GB, 1x80GB, 1x8GB, 2x8xH100-80GB-IB, 2xA10-24GB, 4xA100-40GB-SXM, 4xH100-80GB-NVLink4, 8xA100-80GB-NVSwitch, cpu"
    ]


def test_pack_into_a_file(tmp_path, capsys):
    make_dataset(tmp_path / "in", 2)
    (tmp_path / "out").write_text("not a folder")
    code, err = run(["pack", str(tmp_path / "in"), str(tmp_path / "out"), "--resolution", "64"], capsys)
    assert code == 2
    assert_one_message(err, str(tmp_path / "out"), "choose another")


def test_pack_on_a_full_disk(tmp_path, capsys, monkeypatch):
    make_dataset(tmp_path / "in", 4)
    monkeypatch.setattr(shards_module, "open", full_disk_open(room=2000), raising=False)
    code, err = run(["pack", str(tmp_path / "in"), str(tmp_path / "out"), "--resolution", "64"], capsys)
    assert code == 2
    assert_one_message(err, "No space left on device", "free some space", str(tmp_path / "out"))


def test_pack_bad_numbers(tmp_path, capsys):
    for flags, needle in (
        (["--resolution", "100"], "--resolution: 100 is not a multiple of 16"),
        (["--samples-per-shard", "0"], "--samples-per-shard: 0 is out of range"),
        (["--image-quality", "101"], "--image-quality: 101 is out of range"),
        (["--threads", "-1"], "--threads: -1 is out of range"),
    ):
        code, err = run(["pack", str(tmp_path / "in"), str(tmp_path / "out"), *flags], capsys)
        assert code == 2
        assert_one_message(err, needle)


def test_inspect_a_shard_that_vanished(tmp_path, capsys):
    make_dataset(tmp_path / "in", 3)
    assert main(["pack", str(tmp_path / "in"), str(tmp_path / "out"), "--resolution", "64"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    shard = tmp_path / "out" / manifest["shards"][0]["name"]
    shard.unlink()
    capsys.readouterr()
    code, err = run(["inspect", str(tmp_path / "out")], capsys)
    assert code == 2
    assert_one_message(err, str(shard), "does not exist")


def test_inspect_a_missing_folder(tmp_path, capsys):
    code, err = run(["inspect", str(tmp_path / "nowhere")], capsys)
    assert code == 2
    assert_one_message(err, str(tmp_path / "nowhere"))


def write_config(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def test_train_missing_weights_and_output_dir_a_file(tmp_path, capsys, caplog):
    config = tiny_config(tmp_path / "run", steps=1)
    config["model"]["weights"] = str(tmp_path / "missing.safetensors")
    with caplog.at_level(logging.ERROR):
        code, err = run(["train", "--config", str(write_config(tmp_path, config))], capsys, caplog)
    assert code == 2
    assert_one_message(err, "model.weights", "missing.safetensors does not exist", "diffusion_models")

    (tmp_path / "afile").write_text("")
    config = tiny_config(tmp_path / "afile", steps=1)
    with caplog.at_level(logging.ERROR):
        code, err = run(["train", "--config", str(write_config(tmp_path, config))], capsys, caplog)
    assert code == 2
    assert_one_message(err, "run.output_dir", "is a file, not a folder")


def test_train_bad_config_value(tmp_path, capsys, caplog):
    config = tiny_config(tmp_path / "run", steps=1)
    config["optim"]["weight_decay"] = float("inf")
    with caplog.at_level(logging.ERROR):
        code, err = run(["train", "--config", str(write_config(tmp_path, config))], capsys, caplog)
    assert code == 2
    assert_one_message(err, "optim.weight_decay: must be a finite number >= 0, got inf")


def test_train_on_a_full_disk_fails_the_run_with_one_message(tmp_path, capsys, monkeypatch):
    config = tiny_config(tmp_path / "run", steps=2, micro_batch=1, grad_accum=1, save_state=False)
    path = write_config(tmp_path, config)
    # the LoRA file's write fails; status.json still fits (the status on a full disk is the failure path's test)
    monkeypatch.setattr(atomic_module, "open", full_disk_open(room=100, only="lora.safetensors"), raising=False)
    code, err = run(["train", "--config", str(path)], capsys)
    assert code == 2
    assert_one_message(err, "No space left on device", "lora.safetensors", "free some space")
    assert read_status(tmp_path / "run")["state"] == "failed"


def test_a_bug_is_exit_1_with_the_traceback_in_a_log_file(tmp_path, capsys, monkeypatch):
    import training.hardware.cli as plan_cli

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(plan_cli, "make_plan", broken)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    code, err = run(["plan", "--tier", "cpu"], capsys)
    assert code == 1
    assert "Traceback" not in err and "internal error (plan): KeyError" in err
    log = Path(re.search(r"the traceback is in (\S+);", err).group(1))
    assert log.parent == tmp_path / "whetstone-errors"
    text = log.read_text()
    assert text.startswith("python -m training plan --tier cpu") and "Traceback" in text and "in broken" in text


def test_log_level_after_the_command():
    for argv in (["plan", "--tier", "cpu", "--log-level", "WARNING"], ["--log-level", "WARNING", "plan"]):
        assert build_parser("plan").parse_args(argv).log_level == "WARNING"
    assert build_parser("plan").parse_args(["plan"]).log_level == "INFO"


def test_demo_output_a_file_and_bad_steps(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    code, err = run(["demo", "--output", str(tmp_path / "afile")], capsys)
    assert code == 2
    assert_one_message(err, "demo --output", "is a file, not a folder")
    code, err = run(["demo", "--steps", "5"], capsys)
    assert code == 2
    assert_one_message(err, "--steps: 5 is out of range", "10..10000")


def test_demo_writes_outside_the_current_folder_by_default():
    """No --output: a new temporary folder (resolved in run_demo), never a folder in the checkout."""
    from training.apps.demo import DemoSettings

    assert build_parser("demo").parse_args(["demo"]).output is None
    assert DemoSettings().output is None
