"""The jobs route (list, report, stop, resume) under hostile inputs, Train in the background and Wait for Run, with
the ComfyUI bridge faked and the engine for real (tiny model, CPU)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from test_nodes_pack import FakeCLIP, FakeVAE, make_images
from test_nodes_support import FakeInterrupt, install_fake_comfy, pack_module, snapshot_files

from training.lock import FolderLock, folder_locked
from training.model.config import PRESETS
from training.model.weights import save_weights
from training.model.zimage import ZImageTransformer
from training.run.events import read_status, write_status
from training.run.jobs import JobRecord, JobStore

jobs_api = pack_module("nodes.jobs_api")
background = pack_module("nodes.background")
wait_node = pack_module("nodes.wait_node")
train_node = pack_module("nodes.train_node")
plan_node = pack_module("nodes.plan_node")
pack_node = pack_module("nodes.pack_node")
bridge = pack_module("nodes.comfy_bridge")


@pytest.fixture
def comfy(tmp_path, monkeypatch):
    fake = install_fake_comfy(tmp_path, monkeypatch)
    monkeypatch.setenv(jobs_api.GPUS_ENV, "")  # a CPU machine: jobs take no GPU
    monkeypatch.setattr(jobs_api, "_schedulers", {})
    yield fake
    for scheduler in jobs_api._schedulers.values():
        scheduler.stop_thread()
        for run in list(scheduler.processes):
            scheduler.stop(run)
        deadline = time.monotonic() + 120
        while scheduler.processes and time.monotonic() < deadline:
            scheduler.tick()
            time.sleep(0.2)


def runs(comfy):
    return comfy.folders["whetstone_runs"]


def call(action, query=None, body=None):
    raw = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    return jobs_api.respond(action, query or {}, raw)


# ---------------------------------------------------------------------------- the route, hostile inputs


def test_list_shows_a_run_folder_with_its_state_step_and_sparkline(comfy):
    run_dir = runs(comfy) / "done"
    run_dir.mkdir()
    write_status(run_dir, "completed", "completed at step 100 of 100")
    lines = [json.dumps({"step": s, "loss": 1.0 / s, "time": 10.0 + s}) for s in range(1, 101)]
    (run_dir / "events.jsonl").write_text("\n".join(lines) + "\n" + '{"step": 101, "lo')  # a half-written line
    (run_dir / "config.json").write_text(json.dumps({"run": {"steps": 100, "lora_path": "/elsewhere/x.safetensors"}}))
    (runs(comfy) / "empty").mkdir()  # no status: not a job
    status, body = call("list")
    assert status == 200 and [job["run"] for job in body["jobs"]] == ["done"]
    job = body["jobs"][0]
    assert job["state"] == "completed" and job["step"] == 100 and job["total_steps"] == 100
    assert len(job["sparkline"]) == jobs_api.SPARK_POINTS and job["sparkline"][0] > job["sparkline"][-1]
    assert job["lora_name"] is None, "a LoRA path outside the loras folder is not offered for loading"
    status, png = call("report", {"run": "done"})
    assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"\xff\xfe",
        b"[]",
        b'{"run": "a", "extra": 1}',
        b'{"run": 1e999}',
        b'{"run": null}',
        json.dumps({"run": "x" * 10_000}).encode(),
        json.dumps({"run": "../" * 5 + "etc"}).encode(),
        json.dumps({"run": "/etc/passwd"}).encode(),
        json.dumps({"run": "a/../../b"}).encode(),
        json.dumps({"run": ".whetstone-jobs"}).encode(),
        json.dumps({"run": "a\u0000b"}).encode(),
        None,
    ],
)
@pytest.mark.parametrize("action", ["stop", "resume"])
def test_actions_refuse_malformed_bodies_and_names_without_writing(comfy, action, body):
    before = snapshot_files(comfy.root)
    status, answer = call(action, body=body)
    assert status == 400 and answer["error"]
    assert snapshot_files(comfy.root) == before


def test_oversized_body_is_refused(comfy):
    status, answer = call("stop", body=b"{" + b" " * jobs_api.MAX_BODY_BYTES + b'"run": "a"}')
    assert status == 400 and "at most" in answer["error"]


def test_links_out_of_the_runs_folder_are_not_followed(comfy, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    write_status(outside, "stopped", "SECRET message outside the runs folder")
    (outside / "config.json").write_text(json.dumps({"run": {"steps": 5}}))
    (outside / "events.jsonl").write_text(json.dumps({"step": 1, "loss": 123.0}) + "\n")
    (runs(comfy) / "linked").symlink_to(outside)
    inner = runs(comfy) / "inner"
    inner.mkdir()
    (inner / "status.json").symlink_to(outside / "status.json")
    (inner / "events.jsonl").symlink_to(outside / "events.jsonl")
    status, body = call("list")
    assert status == 200 and body["jobs"] == [] and "SECRET" not in json.dumps(body)
    for action in ("stop", "resume"):
        status, answer = call(action, body={"run": "linked"})
        assert status == 400 and "links are not followed" in answer["error"]
    status, answer = call("report", {"run": "linked"})
    assert status == 400
    assert jobs_api.recent_events(inner) == [], "an events file that is a link is not read"
    assert read_status(outside)["state"] == "stopped", "nothing outside was touched"


@pytest.mark.parametrize("name", ["a" * 300, "a\x00b/x.safetensors"])
def test_a_lora_path_the_filesystem_refuses_does_not_break_the_list(comfy, name):
    run_dir = runs(comfy) / "odd"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"run": {"lora_path": f"{comfy.folders['loras']}/{name}"}}))
    write_status(run_dir, "completed", "done")
    status, body = call("list")
    assert status == 200 and [(job["run"], job["lora_name"]) for job in body["jobs"]] == [("odd", None)]


def full_run(comfy, name: str, model_path, *, state="completed", mode="full", saves: bytes | None = None):
    """A run folder as Train (mode full) leaves it: config.json naming the model's file, the model (``saves``)
    written after it as the engine does at the end, then the end's status."""
    run_dir = runs(comfy) / name
    run_dir.mkdir()
    config = {"mode": mode, "run": {"steps": 2, "model_path": model_path}}
    (run_dir / "config.json").write_text(json.dumps(config))
    if saves is not None:
        Path(model_path).parent.mkdir(parents=True, exist_ok=True)
        Path(model_path).write_bytes(saves)
    write_status(run_dir, state, f"{state} at step 2 of 2")
    return run_dir


def saved_model(comfy, name: str, content: bytes = b"the fine-tuned model") -> Path:
    path = comfy.folders["diffusion_models"] / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_a_full_fine_tune_that_saved_its_model_offers_it_by_its_diffusion_models_name(comfy):
    def run(name, **how):
        model = comfy.folders["diffusion_models"] / "whetstone" / f"{name}.safetensors"
        return full_run(comfy, name, str(model), saves=b"the fine-tuned model", **how)

    run("ft")
    run("ft_stopped", state="stopped")
    run("ft_failed", state="failed")
    run("lora_run", mode="lora")
    lock = FolderLock(run("ft_exiting"), "training").acquire()  # status written, the process not gone: running
    try:
        jobs = {job["run"]: job for job in call("list")[1]["jobs"]}
    finally:
        lock.release()
    assert {name: (job["state"], job["model_name"], job["lora_name"]) for name, job in jobs.items()} == {
        "ft": ("completed", "whetstone/ft.safetensors", None),
        "ft_stopped": ("stopped", "whetstone/ft_stopped.safetensors", None),  # a stop saves the model so far
        "ft_failed": ("failed", None, None),
        "lora_run": ("completed", None, None),  # a LoRA run's model_path is not its result
        "ft_exiting": ("running", None, None),
    }


def test_a_model_older_than_the_run_is_not_offered(comfy):
    model = saved_model(comfy, "whetstone/again.safetensors", b"an earlier run's model of the same name")
    run_dir = full_run(comfy, "again", str(model), state="stopped")  # stopped before it trained: nothing saved
    config_time = (run_dir / "config.json").stat().st_mtime
    os.utime(model, (config_time - 3600, config_time - 3600))
    assert job("again")["model_name"] is None
    os.utime(model, (config_time + 5, config_time + 5))  # saved by this run, at its end
    assert job("again")["model_name"] == "whetstone/again.safetensors"


def test_a_hostile_model_path_is_never_offered(comfy, tmp_path, monkeypatch):
    models = comfy.folders["diffusion_models"]
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.safetensors"
    secret.write_bytes(b"SECRET weights outside diffusion_models")
    (models / "escape.safetensors").symlink_to(secret)  # ComfyUI lists it (it follows links): it leads out
    (models / "linked").symlink_to(outside, target_is_directory=True)
    inside = saved_model(comfy, "whetstone/real.safetensors")
    (models / "alias.safetensors").symlink_to(inside)  # a link, even one staying inside, is not followed
    saved_model(comfy, "notes.txt", b"not a model ComfyUI lists")
    listed = comfy.list_files
    monkeypatch.setattr(bridge, "list_files", lambda folder: [n for n in listed(folder) if n.endswith(".safetensors")])
    hostile = {
        "outside": str(secret),
        "dotdot": f"{models}/whetstone/../../../outside/secret.safetensors",
        "link_out": str(models / "escape.safetensors"),
        "folder_link_out": str(models / "linked" / "secret.safetensors"),
        "link_in": str(models / "alias.safetensors"),
        "relative": "whetstone/real.safetensors",
        "the_folder": str(models / "whetstone"),
        "unlisted": str(models / "notes.txt"),
        "missing": str(models / "whetstone" / "missing.safetensors"),
        "long": str(models / ("a" * 300)),
        "huge": str(models) + "/a" * 2000,
        "nul": f"{models}/real\x00.safetensors",
        "shell": f"{models}/$(touch pwned).safetensors",
        "number": 7,
        "list": [str(inside)],
    }
    for name, value in hostile.items():
        full_run(comfy, name, value)
    later = time.time() + 60  # every file is newer than the runs: only the check of the path refuses it
    for path in [*models.rglob("*"), secret]:
        os.utime(path, (later, later), follow_symlinks=False)
    before = snapshot_files(comfy.root)
    status, body = call("list")
    assert status == 200 and sorted(job["run"] for job in body["jobs"]) == sorted(hostile)
    assert [(job["run"], job["model_name"]) for job in body["jobs"] if job["model_name"] is not None] == []
    assert "SECRET" not in json.dumps(body) and snapshot_files(comfy.root) == before


def test_a_hostile_queue_file_and_huge_values_do_not_break_the_list(comfy):
    store = JobStore(runs(comfy))
    store.folder.mkdir(parents=True)
    hostile = [{"run": "../x"}, {"run": "ok", "gpu_count": 10**30}, {"run": "ok2", "pid": -5}, "junk"]
    store.path.write_text(json.dumps({"jobs": hostile + [{"run": "fine", "queued_at": 1.0}]}))
    run_dir = runs(comfy) / "fine"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"run": {"steps": 10**400}}))  # json: a huge int
    status, body = call("list")
    assert status == 200 and [(j["run"], j["state"]) for j in body["jobs"]] == [("fine", "queued")]
    assert body["jobs"][0]["total_steps"] is None, "a step count the browser cannot hold is left out"
    (run_dir / "events.jsonl").write_text(json.dumps({"step": 2**60, "loss": 1.0}) + "\n" + '{"step": true}\n')
    assert call("list")[1]["jobs"][0]["step"] is None


HUGE_INT = "9" * 5000  # json.loads raises ValueError (Python's 4300-digit limit), not JSONDecodeError
DEEP = "[" * 100_000  # json.loads raises RecursionError


def test_json_that_python_refuses_to_convert_does_not_break_the_list(comfy):
    """A run's events, config or summary with a 5000-digit integer or nesting too deep is one run's bad file: the
    list still answers 200 with every run (it answered 409 with Python's digit-limit message)."""
    good = runs(comfy) / "good"
    good.mkdir()
    write_status(good, "completed", "done")
    (good / "events.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")
    hostile = runs(comfy) / "hostile"
    hostile.mkdir()
    write_status(hostile, "completed", "done")
    lines = ['{"step": 1, "loss": ' + HUGE_INT + "}", DEEP, json.dumps({"step": 2, "loss": 0.25})]
    (hostile / "events.jsonl").write_text("\n".join(lines) + "\n")
    (hostile / "config.json").write_text('{"run": {"steps": ' + HUGE_INT + "}}")
    (hostile / "summary.json").write_text(DEEP)
    status, body = call("list")
    assert status == 200, body
    jobs = {job["run"]: job for job in body["jobs"]}
    assert set(jobs) == {"good", "hostile"} and jobs["hostile"]["step"] == 2 and jobs["hostile"]["total_steps"] is None
    assert jobs["hostile"]["summary"] == {}
    assert call("report", {"run": "hostile"})[0] == 200


@pytest.mark.parametrize("queue", ['{"jobs": [{"run": "a", "gpu_count": ' + HUGE_INT + "}]}", DEEP])
def test_a_queue_file_python_refuses_to_convert_is_an_empty_queue(comfy, queue, caplog):
    """The job queue (runs/.whetstone-jobs/jobs.json) with a 5000-digit integer or nesting too deep is logged and
    read as empty, as any queue file that is not JSON (the jobs list answered 409 with Python's digit-limit message)."""
    store = JobStore(runs(comfy))
    store.folder.mkdir(parents=True)
    store.path.write_text(queue)
    done = runs(comfy) / "done"
    done.mkdir()
    write_status(done, "completed", "done")
    status, body = call("list")
    assert status == 200 and [job["run"] for job in body["jobs"]] == ["done"]
    assert "not valid JSON" in caplog.text


def test_stop_of_a_run_that_is_no_background_job_says_so(comfy):
    run_dir = runs(comfy) / "foreground"
    run_dir.mkdir()
    write_status(run_dir, "completed", "done")
    status, answer = call("stop", body={"run": "foreground"})
    assert status == 404 and "background" in answer["error"]
    status, answer = call("resume", body={"run": "foreground"})
    assert status == 404 and "config.json" in answer["error"]
    (run_dir / "config.json").write_text("{}")
    status, answer = call("resume", body={"run": "foreground"})
    assert status == 400 and "only a stopped or failed run resumes" in answer["error"]


def test_unknown_action(comfy):
    assert call("delete", body={"run": "a"})[0] == 404


# ---------------------------------------------------------------------------- the Train node in the background


def defaults(widgets, **overrides):
    return {**{name: widget.default for name, widget in widgets.items()}, **overrides}


def packed_and_planned(comfy):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    save_weights(ZImageTransformer(PRESETS["tiny"]), comfy.folders["diffusion_models"] / "tiny.safetensors")
    make_images(comfy.folders["input"] / "photos", count=2)
    pack_settings = defaults(
        pack_node.WIDGETS, image_folder="photos", dataset_name="set", resolution=256, too_small="upscale"
    )
    dataset, _ = pack_node.PackDataset().pack(vae=FakeVAE(), clip=FakeCLIP(), **pack_settings)["result"]
    settings = defaults(plan_node.WIDGETS, tier="cpu", resolution=256, lora_rank=4, target_batch=1)
    return dataset, plan_node.TrainingPlan().plan("tiny.safetensors", **settings)["result"][0]


def start_in_background(comfy, dataset, plan, name, steps, **extra):
    settings = defaults(train_node.WIDGETS, run_name=name, steps=steps, save_every=0, caption_dropout=0.0)
    started = time.monotonic()
    output = train_node.Train().train(plan, dataset, "tiny.safetensors", background=True, **settings, **extra)
    assert time.monotonic() - started < 30, "background mode returns at once"
    return output["result"]


def job(name):
    return next(j for j in call("list")[1]["jobs"] if j["run"] == name)


def wait_for(predicate, what, timeout_s=180):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def test_pinned_gpus_must_match_the_plan(comfy):
    plan = type("Plan", (), {"world_size": 2, "device": "cuda"})()
    assert background.gpu_request(plan, None) == 2 and background.gpu_request(plan, (1, 3)) == 2
    with pytest.raises(ValueError, match="names 1 GPU"):
        background.gpu_request(plan, (1,))
    with pytest.raises(ValueError, match="gpus"):
        background.options({"background": True, "gpus": "0;rm"})
    assert background.options({}) == background.BackgroundOptions(background=False, gpu_ids=None)


@pytest.mark.slow
def test_background_train_then_wait_then_stop_and_resume_through_the_route(comfy):
    dataset, plan = packed_and_planned(comfy)
    run, lora_name, report = start_in_background(comfy, dataset, plan, "quick", steps=3)
    assert run.state in ("queued", "starting") and "background job quick" in report
    waited, waited_lora, state = wait_node.WaitForRun().wait(run, until="end", timeout_minutes=5)
    assert waited.state == "completed" and waited_lora == lora_name == "quick.safetensors"
    assert (comfy.folders["loras"] / lora_name).is_file() and state.startswith("completed")
    assert job("quick")["lora_name"] == "quick.safetensors" and job("quick")["state"] == "completed"

    long_run, _, _ = start_in_background(comfy, dataset, plan, "long", steps=1_000_000)
    wait_for(lambda: (job("long")["step"] or 0) >= 2, "the long job to train")
    listed = job("long")
    assert listed["state"] == "running" and listed["total_steps"] == 1_000_000 and listed["eta_s"] > 0
    status, answer = call("resume", body={"run": "long"})
    assert status == 400 and "is running" in answer["error"], "a running job does not resume"
    status, answer = call("stop", body={"run": "long"})
    assert status == 200 and answer["result"] == "stopping"
    wait_for(lambda: job("long")["state"] == "stopped", "the stop")
    stopped_at = read_status(runs(comfy) / "long")["message"]
    status, answer = call("resume", body={"run": "long"})
    assert status == 200 and answer["result"] == "queued"
    wait_for(lambda: job("long")["state"] == "running" and folder_locked(runs(comfy) / "long"), "the resume")
    wait_for(lambda: "step" in read_status(runs(comfy) / "long")["message"], "the resumed run to report")
    assert call("stop", body={"run": "long"})[1]["result"] == "stopping"
    wait_for(lambda: job("long")["state"] == "stopped", "the second stop")
    steps = [json.loads(line)["step"] for line in (runs(comfy) / "long" / "events.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps)), f"resumed after {stopped_at}, not from 0"


@pytest.mark.slow
def test_background_train_names_its_job_for_the_nodes_chart(comfy):
    """js/whetstone.js follows the job the ui names (polling its run history): run, total steps, when queued."""
    dataset, plan = packed_and_planned(comfy)
    settings = defaults(train_node.WIDGETS, run_name="charted", steps=2, save_every=0, caption_dropout=0.0)
    output = train_node.Train().train(plan, dataset, "tiny.safetensors", background=True, **settings)
    (named,) = output["ui"]["whetstone_background"]
    assert named == {"run": "charted", "total_steps": 2, "submitted_at": job("charted")["queued_at"]}
    waited, _, _ = wait_node.WaitForRun().wait(output["result"][0], until="end", timeout_minutes=5)
    assert waited.state == "completed"
    assert read_status(runs(comfy) / "charted")["time"] > named["submitted_at"], "the chart sees the job's own end"


def test_plan_for_a_gpu_subset_skips_gpus_other_jobs_hold(comfy):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    save_weights(ZImageTransformer(PRESETS["tiny"]), comfy.folders["diffusion_models"] / "tiny.safetensors")
    settings = defaults(plan_node.WIDGETS, tier="4xA100-40GB-SXM", resolution=512, lora_rank=16)
    whole = plan_node.TrainingPlan().plan("tiny.safetensors", **settings)["result"][0]
    half = plan_node.TrainingPlan().plan("tiny.safetensors", gpu_count=2, **settings)["result"][0]
    assert whole.world_size == 4 and half.world_size == 2
    assert half.global_batch % 2 == 0 and half.lr <= whole.lr, "the lr scales with the GPUs planned for"
    with pytest.raises(ValueError, match="gpu_count=8"):
        plan_node.TrainingPlan().plan("tiny.safetensors", gpu_count=8, **settings)


def test_wait_gives_up_on_interrupt_and_reports_a_failed_run(comfy):
    run_dir = runs(comfy) / "w"
    run_dir.mkdir()
    with JobStore(runs(comfy)).edit() as records:
        records.append(JobRecord(run="w", queued_at=time.time()))
    values = pack_module("nodes.values")
    run = values.RunRef(
        run_dir=run_dir, lora_path=comfy.folders["loras"] / "w.safetensors", lora_name="w.safetensors", state="queued"
    )
    comfy.interrupted = True
    with pytest.raises(FakeInterrupt):
        wait_node.WaitForRun().wait(run, until="lora", timeout_minutes=0)
    with JobStore(runs(comfy)).edit() as records:
        records[0].launched_at = time.time()
    write_status(run_dir, "failed", "CUDA out of memory")
    with pytest.raises(RuntimeError, match="w failed: CUDA out of memory"):
        wait_node.WaitForRun().wait(run, until="lora", timeout_minutes=0)
