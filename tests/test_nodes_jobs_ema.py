"""The jobs route's EMA result (``ema_lora_name``, ``ema_model_name``): the ``<name>_ema`` twin of a run's LoRA or
full fine-tune's model, offered when the run's summary reports it and the file passes the checks the model does;
hostile summaries and twins are never offered (bridge faked; a real EMA run on the tiny model, CPU)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from test_nodes_jobs import call, comfy, defaults, job, runs, start_in_background, wait_for  # noqa: F401 (fixture)
from test_nodes_jobs_results import packed
from test_nodes_support import pack_module, snapshot_files

from training.model.weights import read_header
from training.run.events import write_status

plan_node = pack_module("nodes.plan_node")
bridge = pack_module("nodes.comfy_bridge")
FIELDS = {"lora": "lora_path", "full": "model_path"}


def listed_name(mode: str, name: str, end: str = "") -> str:
    """A run's result (``end`` "_ema": its EMA twin) as ComfyUI lists it: a LoRA in loras, a full fine-tune's model
    in diffusion_models/whetstone, as Train puts them."""
    return f"{name}{end}.safetensors" if mode == "lora" else f"whetstone/{name}{end}.safetensors"


def result_file(fake, mode: str, name: str) -> Path:
    return fake.folders["loras" if mode == "lora" else "diffusion_models"] / listed_name(mode, name)


def twin_of(path: Path) -> Path:
    return path.with_name(f"{path.stem}_ema{path.suffix}")


def ended_run(fake, name: str, mode: str, *, summary=None, state="completed", twin: bytes | None = b"EMA") -> Path:
    """A run folder as an EMA run leaves it: config.json, then the result and its EMA twin, the summary, the status."""
    run_dir = runs(fake) / name
    run_dir.mkdir()
    result = result_file(fake, mode, name)
    (run_dir / "config.json").write_text(json.dumps({"mode": mode, "run": {"steps": 2, FIELDS[mode]: str(result)}}))
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_bytes(b"the trained weights")
    if twin is not None:
        twin_of(result).write_bytes(twin)
    reported = {"ema_file": str(twin_of(result))} if summary is None else summary
    if reported != "none":
        (run_dir / "summary.json").write_text(json.dumps(reported))
    write_status(run_dir, state, f"{state} at step 2 of 2")
    return run_dir


def offered(name: str) -> tuple:
    listed = job(name)
    return listed["lora_name"], listed["model_name"], listed["ema_lora_name"], listed["ema_model_name"]


def test_the_ema_twin_the_summary_reports_is_offered_beside_the_lora_or_the_model(comfy):  # noqa: F811
    ended_run(comfy, "avg", "lora")
    ended_run(comfy, "ft", "full")
    ended_run(comfy, "ft_stopped", "full", state="stopped")  # a stop saves the model and its EMA so far
    ended_run(comfy, "ft_failed", "full", state="failed")  # no model offered: no EMA either
    ended_run(comfy, "no_summary", "lora", summary="none")  # still running, or stopped before the summary
    ended_run(comfy, "no_ema", "lora", summary={"ema_file": None})  # a run without EMA: a twin left by another
    ended_run(comfy, "not_saved", "full", twin=None)  # reported, but not there
    assert offered("avg") == ("avg.safetensors", None, "avg_ema.safetensors", None)
    assert offered("ft") == (None, "whetstone/ft.safetensors", None, "whetstone/ft_ema.safetensors")
    assert offered("ft_stopped") == (
        None,
        "whetstone/ft_stopped.safetensors",
        None,
        listed_name("full", "ft_stopped", "_ema"),
    )
    assert offered("ft_failed") == (None, None, None, None)
    assert offered("no_summary") == ("no_summary.safetensors", None, None, None)
    assert offered("no_ema") == ("no_ema.safetensors", None, None, None)
    assert offered("not_saved") == (None, "whetstone/not_saved.safetensors", None, None)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_an_ema_twin_older_than_the_run_is_not_offered(comfy, mode):  # noqa: F811
    run_dir = ended_run(comfy, "again", mode)
    twin = twin_of(result_file(comfy, mode, "again"))
    config_time = (run_dir / "config.json").stat().st_mtime
    os.utime(twin, (config_time - 3600, config_time - 3600))  # an earlier run's EMA of the same name
    assert job("again")["ema_lora_name"] is job("again")["ema_model_name"] is None
    os.utime(twin, (config_time + 5, config_time + 5))
    field = "ema_lora_name" if mode == "lora" else "ema_model_name"
    assert job("again")[field] == listed_name(mode, "again", "_ema")


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_a_hostile_summary_or_ema_twin_is_never_offered(comfy, tmp_path, monkeypatch, mode):  # noqa: F811
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret_ema.safetensors"
    secret.write_bytes(b"SECRET weights outside the model folders")
    (outside / "summary.json").write_text(json.dumps({"ema_file": "SECRET"}))
    folder = result_file(comfy, mode, "x").parent
    folder.mkdir(exist_ok=True)
    (folder / "other.safetensors").write_bytes(b"another listed file, not the run's EMA")
    listed = comfy.list_files
    monkeypatch.setattr(bridge, "list_files", lambda name: [n for n in listed(name) if "unlisted_ema" not in n])
    summaries = {
        "other_file": {"ema_file": str(folder / "other.safetensors")},
        "relative": {"ema_file": "other.safetensors"},
        "outside": {"ema_file": str(secret)},
        "dotdot": {"ema_file": f"{folder}/../../outside/secret_ema.safetensors"},
        "number": {"ema_file": 7},
        "list": {"ema_file": [str(folder / "x_ema.safetensors")]},
        "nul": {"ema_file": f"{folder}/x\x00_ema.safetensors"},
        "not_an_object": ["ema_file"],
    }
    for name, summary in summaries.items():
        ended_run(comfy, name, mode, summary=summary)
    twins = {  # the summary names the twin; the twin is not a plain file of the folder
        "link_out": lambda twin: twin.symlink_to(secret),  # ComfyUI lists it (it follows links): it leads out
        "link_in": lambda twin: twin.symlink_to(folder / "other.safetensors"),  # a link is not followed
        "a_folder": lambda twin: twin.mkdir(),
        "unlisted": lambda twin: twin.write_bytes(b"a file ComfyUI does not list"),
    }
    for name, make in twins.items():
        make(twin_of(result_file(comfy, mode, name)))
        ended_run(comfy, name, mode, twin=None)
    links = {
        "summary_link": lambda run_dir: (run_dir / "summary.json").symlink_to(outside / "summary.json"),
        "summary_huge": lambda run_dir: (run_dir / "summary.json").write_bytes(b" " * (2 << 20) + b"{}"),
        "summary_not_json": lambda run_dir: (run_dir / "summary.json").write_bytes(b"\xff{not json"),
    }
    for name, make in links.items():
        make(ended_run(comfy, name, mode, summary="none"))
    later = time.time() + 60  # every file is newer than the runs: only the other checks refuse them
    for path in [*folder.rglob("*"), secret]:
        os.utime(path, (later, later), follow_symlinks=False)
    before = snapshot_files(comfy.root)
    status, body = call("list")
    hostile = {**summaries, **twins, **links}
    assert status == 200 and sorted(job["run"] for job in body["jobs"]) == sorted(hostile)
    field = "lora_name" if mode == "lora" else "model_name"
    raw = {job["run"]: job[field] for job in body["jobs"]}
    assert raw == {name: listed_name(mode, name) for name in hostile}, "the result is offered: only its EMA is not"
    assert [job["run"] for job in body["jobs"] if job["ema_lora_name"] or job["ema_model_name"]] == []
    assert "SECRET" not in json.dumps(body) and snapshot_files(comfy.root) == before


@pytest.mark.slow
def test_a_background_lora_run_with_ema_offers_its_ema_lora(comfy):  # noqa: F811
    dataset = packed(comfy)
    settings = defaults(plan_node.WIDGETS, tier="cpu", resolution=256, lora_rank=4, target_batch=1, ema="auto")
    plan = plan_node.TrainingPlan().plan("tiny.safetensors", **settings)["result"][0]
    assert plan.ema == "device"
    start_in_background(comfy, dataset, plan, "bgema", steps=2, ema_decay=0.5)
    wait_for(lambda: job("bgema")["state"] == "completed", "the run's end")
    assert offered("bgema") == ("bgema.safetensors", None, "bgema_ema.safetensors", None)
    raw, ema = (comfy.folders["loras"] / name for name in ("bgema.safetensors", "bgema_ema.safetensors"))
    assert read_header(raw) == read_header(ema) and read_header(raw), "the EMA LoRA: the same tensors"
    assert raw.read_bytes() != ema.read_bytes(), "averaged (decay 0.5), not a copy of the trained weights"
