"""What the nodes refuse at queue time (VALIDATE_INPUTS) and what their panels say: how a run ended, "stopping…"
after Cancel, and the chart's history read back from a run folder after a browser reload."""

from __future__ import annotations

import importlib.util
import json

import pytest
from test_nodes_support import install_fake_comfy, pack_module

from training.engine import quantize
from training.run.events import write_status

lora_node = pack_module("nodes.lora_node")
plan_node = pack_module("nodes.plan_node")
train_node = pack_module("nodes.train_node")
run_history = pack_module("nodes.run_history")


@pytest.fixture
def comfy(tmp_path, monkeypatch):
    fake = install_fake_comfy(tmp_path, monkeypatch)
    (fake.folders["loras"] / "mine.safetensors").write_bytes(b"x")
    return fake


# ---------------------------------------------------------------------------------------------------------------------
# queue-time validation


def test_lora_name_must_exist_unless_a_run_is_linked(comfy):
    validate = lora_node.LoadTrainedLoRA.VALIDATE_INPUTS
    assert validate("mine.safetensors", {"model": "MODEL"}) is True
    missing = validate("my_lora_cpu.safetensors", {"model": "MODEL"})
    assert "not in the loras folder" in missing and "link a Train run" in missing
    assert "no LoRA chosen" in validate("", {"model": "MODEL"})
    assert validate("my_lora_cpu.safetensors", {"model": "MODEL", "run": "WHETSTONE_RUN"}) is True


def test_lora_node_checks_link_types_itself(comfy):
    """Taking input_types turns off ComfyUI's link type check for the node: it must refuse wrong links itself."""
    validate = lora_node.LoadTrainedLoRA.VALIDATE_INPUTS
    assert "needs MODEL" in validate("mine.safetensors", {"model": "CLIP"})
    assert "needs WHETSTONE_RUN" in validate("mine.safetensors", {"model": "MODEL", "run": "STRING"})


def test_qlora_without_bitsandbytes_is_refused_at_queue_time(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        quantize.importlib.util, "find_spec", lambda name: None if name == "bitsandbytes" else real_find_spec(name)
    )
    message = plan_node.TrainingPlan.VALIDATE_INPUTS("qlora")
    assert "bitsandbytes" in message and "pip install bitsandbytes" in message and "mode 'lora'" in message
    assert plan_node.TrainingPlan.VALIDATE_INPUTS("lora") is True


def test_qlora_with_bitsandbytes_installed_passes():
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed here")
    assert plan_node.TrainingPlan.VALIDATE_INPUTS("qlora") is True


@pytest.mark.parametrize("name", ["../escaped", "run name", "", "a/b"])
def test_train_refuses_a_bad_run_name_at_queue_time(name):
    assert "run_name" in train_node.Train.VALIDATE_INPUTS(name)


def test_train_accepts_a_plain_run_name():
    assert train_node.Train.VALIDATE_INPUTS("my_lora_cpu") is True


# ---------------------------------------------------------------------------------------------------------------------
# how a run ended, and Cancel


def test_finished_text_says_what_was_saved_and_how_to_resume():
    done = train_node.finished_text("completed", "completed at step 10 of 10", "r", "r.safetensors")
    assert done == "completed at step 10 of 10; LoRA r.safetensors saved in loras"
    assert "completed: completed" not in done
    stopped = train_node.finished_text("stopped", "stopped at step 4 of 10", "r", "r.safetensors")
    assert stopped.startswith("stopped at step 4 of 10: the LoRA so far (r.safetensors)")
    assert "resumable checkpoint" in stopped and "resume on and run_name 'r' to continue" in stopped
    assert train_node.finished_text("failed", "CUDA out of memory", "r", "r.safetensors") == (
        "failed: CUDA out of memory"
    )


class StoppableProcess:
    """A child that runs until asked to stop, writing one event per poll."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.stop_requested = False
        self.step = 0

    def running(self) -> bool:
        if not self.stop_requested:
            self.step += 1
            with open(self.run_dir / "events.jsonl", "a", encoding="utf-8") as events:
                events.write(json.dumps({"step": self.step, "loss": 0.5}) + "\n")
        return not self.stop_requested

    def request_stop(self) -> None:
        self.stop_requested = True

    def wait(self, timeout):
        return 0


def test_cancel_sends_stopping_before_the_child_stops(comfy, tmp_path):
    process = StoppableProcess(tmp_path)
    progress = train_node.Progress("7", "r", total_steps=100)
    comfy.interrupt_after_progress = 2
    assert train_node.follow(process, progress, poll_seconds=0) is True
    kinds = [data["kind"] for _, data in comfy.events]
    assert kinds[-1] == "stopping" and process.stop_requested
    message = comfy.events[-1][1]["message"]
    assert message.startswith("Stopping… finishing step ") and "saving the LoRA and a resumable checkpoint" in message


# ---------------------------------------------------------------------------------------------------------------------
# the chart's history after a reload


def _run(comfy, name="r"):
    run_dir = comfy.folders["whetstone_runs"] / name
    run_dir.mkdir()
    return run_dir


def test_history_has_every_point_and_the_state(comfy):
    run_dir = _run(comfy)
    lines = [json.dumps({"step": step, "loss": 1.0 / step}) for step in range(1, 6)]
    (run_dir / "events.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    status = {"state": "completed", "message": "completed at step 5 of 5"}
    (run_dir / "status.json").write_text(json.dumps(status), encoding="utf-8")
    status_code, history = run_history.respond({"run": "r"})
    assert status_code == 200
    assert history["points"] == [[step, pytest.approx(1.0 / step)] for step in range(1, 6)]
    assert (history["state"], history["message"], history["step"]) == ("completed", "completed at step 5 of 5", 5)


def test_history_of_a_resumed_run_is_the_curve_it_trained(comfy):
    run_dir = _run(comfy)
    steps = [1, 2, 3, 2, 3, 4]  # steps 2-3 written after the last checkpoint, lost, trained again
    lines = [json.dumps({"step": step, "loss": float(index)}) for index, step in enumerate(steps)]
    (run_dir / "events.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert [p[0] for p in run_history.run_history("r")["points"]] == [1, 2, 3, 4]


def test_history_sends_only_numbers_and_ignores_garbage(comfy):
    run_dir = _run(comfy)
    lines = ['{"step": 1, "loss": NaN}', "not json", '{"step": 2, "loss": "evil"}', '{"step": 3, "loss": 0.25}']
    (run_dir / "events.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (run_dir / "status.json").write_text("{broken", encoding="utf-8")
    history = run_history.run_history("r")
    assert history["points"] == [[1, None], [2, None], [3, 0.25]]
    assert history["state"] == ""


def test_history_refuses_paths_and_does_not_follow_links_out(comfy, tmp_path):
    assert run_history.respond({"run": "../../etc"})[0] == 400
    assert run_history.respond({})[0] == 400
    run_dir = _run(comfy)
    outside = tmp_path / "outside.jsonl"
    outside.write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n", encoding="utf-8")
    (run_dir / "events.jsonl").symlink_to(outside)
    assert run_history.run_history("r")["points"] == []


def test_history_of_a_run_not_started_is_empty(comfy):
    empty = {"run": "never", "points": [], "state": "", "message": "", "step": None, "updated": None}
    assert run_history.run_history("never") == empty


def test_history_says_when_the_status_was_written(comfy):
    run_dir = _run(comfy)
    write_status(run_dir, "running", "step 3 of 9")
    written = json.loads((run_dir / "status.json").read_text(encoding="utf-8"))["time"]
    assert run_history.run_history("r")["updated"] == pytest.approx(written)
    (run_dir / "status.json").write_text(json.dumps({"state": "running", "time": "soon"}), encoding="utf-8")
    assert run_history.run_history("r")["updated"] is None  # only a number goes back to the browser
