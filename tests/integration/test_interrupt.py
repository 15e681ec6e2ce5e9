"""In a real ComfyUI 0.8 (opt-in: COMFYUI_PATH): Cancel during training stops the engine politely; the run keeps a
valid LoRA and a checkpoint that a second prompt resumes from.

Where the Cancel lands is up to the machine's speed: the assertions hold for any stop step, including one that ends
an epoch (every IMAGES steps: one sample per step), where the checkpoint's loader position is an epoch's end."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from integration.workflows import make_images, train_prompt

from training.model.lora_file import load_lora_file
from training.run.events import read_events

pytestmark = pytest.mark.comfyui

RUN = "interrupted"
IMAGES = 4
LONG_RUN_STEPS = 1000  # far more than the test waits for: only Cancel ends it
PROGRESS_TIMEOUT_S = 300


def _wait_for_training_progress(comfy_server, connection, prompt_id: str) -> dict:
    deadline = time.monotonic() + PROGRESS_TIMEOUT_S
    while (event := comfy_server.next_event(connection, deadline)) is not None:
        data = event.get("data", {})
        if event["type"] == "execution_error" and data.get("prompt_id") == prompt_id:
            pytest.fail(f"the prompt failed before training progressed: {data.get('exception_message')}")
        if event["type"] == "whetstone.progress" and data.get("kind") == "progress" and data.get("step", 0) >= 1:
            return data
    pytest.fail(f"no training progress within {PROGRESS_TIMEOUT_S} s:\n{comfy_server.log()[-4000:]}")


def test_cancel_during_training_leaves_a_lora_and_a_resumable_checkpoint(comfy_server, zimage_models):
    make_images(comfy_server.base / "input", count=IMAGES)
    client_id = uuid.uuid4().hex
    prompt = train_prompt(zimage_models, run_name=RUN, dataset_name="patterns", steps=LONG_RUN_STEPS)
    connection = comfy_server.open_events(client_id)
    try:
        prompt_id = comfy_server.queue(prompt, client_id)
        progress = _wait_for_training_progress(comfy_server, connection, prompt_id)
    finally:
        connection.close()
    assert progress["run"] == RUN and progress["total_steps"] == LONG_RUN_STEPS and progress["loss"] is not None

    status, _ = comfy_server.post_json("/interrupt", {"prompt_id": prompt_id})
    assert status == 200
    entry = comfy_server.wait(prompt_id, timeout_s=300)
    assert entry["status"]["status_str"] == "error"  # how ComfyUI records a cancelled prompt
    assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"]), entry["status"]

    run_dir = comfy_server.base / "models" / "whetstone_runs" / RUN
    status_file = json.loads((run_dir / "status.json").read_text())
    assert status_file["state"] == "stopped", status_file
    stopped_at = int(status_file["message"].split("step ")[1].split()[0])
    assert 1 <= stopped_at < LONG_RUN_STEPS

    lora = load_lora_file(comfy_server.base / "models" / "loras" / f"{RUN}.safetensors")
    assert lora.state and lora.settings.rank == 4
    assert lora.metadata["steps"] == str(stopped_at)  # the LoRA of the last step trained, not an earlier one
    assert [e["step"] for e in read_events(run_dir)] == list(range(1, stopped_at + 1))
    checkpoint = run_dir / "checkpoints" / f"step-{stopped_at:06d}"
    assert (checkpoint / "checkpoint.json").is_file(), sorted(p.name for p in run_dir.rglob("*"))

    # The same run name with resume on continues from that checkpoint and finishes one step later.
    resumed = train_prompt(zimage_models, run_name=RUN, dataset_name="patterns", steps=stopped_at + 1)
    resumed["train"]["inputs"]["resume"] = True
    comfy_server.run(resumed, timeout_s=300)
    assert f"resuming at step {stopped_at} of {stopped_at + 1}" in (run_dir / "train.log").read_text()
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
    attempts = [e["step"] for e in read_events(run_dir, resumed_history=False)]
    assert attempts == list(range(1, stopped_at + 2)), attempts  # continued at its checkpoint: no step twice
