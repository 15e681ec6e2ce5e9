"""Run a committed GPU-tier workflow end to end in a real ComfyUI on this machine's GPU, as a user would, and print what
they would see: the plan, the training child process, the live events, the loaded LoRA and the sampled image.

    python bench/comfyui_gpu_workflow.py --comfyui PATH --work DIR --out DIR [--tier 1x80GB] [--train-steps 16]

What is real: ComfyUI (started with `--listen 127.0.0.1`, the GPU, the pack under custom_nodes), the committed UI
workflow (converted with tools/workflow_api.py against the server's /object_info and queued over HTTP), a full-size
random-init Z-Image diffusion model (6.15 B, bf16, ComfyUI layout, saved under the name the workflow expects) and the
published-size Flux VAE (random weights). Changed in the API prompt, and printed: CLIPLoader -> the integration
suite's small Qwen3-4B-shaped text encoder (the real one is 8 GB and cannot be downloaded here), Train's steps and
KSampler's steps (so it fits the device budget). No frontend is served (`--front-end-root` names an empty page).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from tools import workflow_api  # noqa: E402
from tools.make_workflows import workflow_path  # noqa: E402

FIXTURES = REPO / "tests" / "integration"


def build_models(work: Path, python: str, comfy: Path, dit_name: str, layers: int | None, device: str) -> dict:
    import torch

    from training.engine.build import random_model
    from training.model.config import ZImageConfig
    from training.model.weights import save_weights

    models = work / "models"
    started = time.monotonic()
    config = ZImageConfig() if layers is None else ZImageConfig(n_layers=layers)
    model = random_model(config, dtype=torch.bfloat16, device=torch.device(device), seed=0)
    count = sum(p.numel() for p in model.parameters())
    (models / "diffusion_models").mkdir(parents=True, exist_ok=True)
    save_weights(model, models / "diffusion_models" / dit_name, layout="comfy", metadata={"whetstone": "random init"})
    del model
    torch.cuda.empty_cache()
    dit_s = time.monotonic() - started
    side = work / "side"
    subprocess.run([python, str(FIXTURES / "comfy_weights.py"), str(side)], cwd=comfy, check=True, timeout=300)
    for folder, name in (("vae", "ae.safetensors"), ("text_encoders", "qwen3_4b_tiny.safetensors")):
        (models / folder).mkdir(parents=True, exist_ok=True)
        shutil.move(str(side / name), models / folder / name)
    return {"dit_parameters": count, "dit_build_and_save_s": round(dit_s, 1)}


def make_images(folder: Path, count: int, size: int) -> None:
    """Structured (not noise) pictures: coloured gradients with a disc, one caption each."""
    folder.mkdir(parents=True, exist_ok=True)
    grid = np.linspace(0.0, 1.0, size, dtype=np.float32)
    for index in range(count):
        rng = np.random.default_rng(index)
        colour = rng.uniform(0.2, 1.0, 3)
        pixels = np.stack([np.outer(grid, grid) * c for c in colour], axis=-1)
        cy, cx, radius = rng.uniform(0.3, 0.7) * size, rng.uniform(0.3, 0.7) * size, size / 6
        yy, xx = np.mgrid[0:size, 0:size]
        pixels[(yy - cy) ** 2 + (xx - cx) ** 2 < radius**2] = rng.uniform(0, 1, 3)
        Image.fromarray((pixels * 255).astype(np.uint8)).save(folder / f"img{index}.png")
        (folder / f"img{index}.txt").write_text(f"a sks disc on a gradient, picture {index}")


class Events(threading.Thread):
    """ComfyUI's /ws messages for one client id, as the frontend receives them (aiohttp client)."""

    def __init__(self, url: str, client_id: str):
        super().__init__(daemon=True)
        self.url, self.client_id, self.messages, self.binary = url, client_id, [], 0
        self.stop = False

    def run(self) -> None:
        asyncio.run(self._listen())

    async def _listen(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{self.url}/ws?clientId={self.client_id}") as socket_:
                while not self.stop:
                    try:
                        message = await socket_.receive(timeout=1.0)
                    except asyncio.TimeoutError:
                        continue
                    if message.type == aiohttp.WSMsgType.TEXT:
                        self.messages.append((time.monotonic(), json.loads(message.data)))
                    elif message.type == aiohttp.WSMsgType.BINARY:
                        self.binary += 1
                    else:
                        return


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def start_comfyui(comfy: Path, python: str, work: Path, log_path: Path, cpu: bool) -> tuple[subprocess.Popen, str]:
    (work / "custom_nodes").mkdir(parents=True, exist_ok=True)
    for name, target in (("ComfyUI-Whetstone", REPO), ("whetstone_test_fixtures", FIXTURES / "comfyui_fixture_nodes")):
        link = work / "custom_nodes" / name
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)
    frontend = work / "frontend"
    frontend.mkdir(exist_ok=True)
    (frontend / "index.html").write_text("<html><body>no frontend in this run</body></html>")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [python, "main.py", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(work)]
    command += ["--disable-auto-launch", "--front-end-root", str(frontend)] + (["--cpu"] if cpu else [])
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=comfy, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"ComfyUI exited ({process.returncode}):\n{log_path.read_text()[-4000:]}")
        try:
            get_json(f"{url}/system_stats")
            return process, url
        except OSError:
            time.sleep(1)
    raise SystemExit(f"ComfyUI did not answer:\n{log_path.read_text()[-4000:]}")


def node_id(prompt: dict, class_type: str) -> str:
    (found,) = [key for key, node in prompt.items() if node["class_type"] == class_type]
    return found


def substitute(prompt: dict, train_steps: int, sample_steps: int) -> list[str]:
    changes = []
    train = prompt[node_id(prompt, "WhetstoneTrain")]["inputs"]
    changes.append(f"Train steps {train['steps']} -> {train_steps}")
    train["steps"] = train_steps
    sampler = prompt[node_id(prompt, "KSampler")]["inputs"]
    changes.append(f"KSampler steps {sampler['steps']} -> {sample_steps}")
    sampler["steps"] = sample_steps
    clip_id = node_id(prompt, "CLIPLoader")
    changes.append(f"CLIPLoader {prompt[clip_id]['inputs']} -> WhetstoneTestSmallQwen3Loader")
    prompt[clip_id] = {
        "class_type": "WhetstoneTestSmallQwen3Loader",
        "inputs": {"clip_name": "qwen3_4b_tiny.safetensors"},
    }
    return changes


def queue(url: str, workflow: dict, prompt: dict, client_id: str) -> tuple[int, dict]:
    """POST /prompt as the frontend does: the UI workflow as PNG metadata, our client id for the /ws messages."""
    body = {"prompt": prompt, "client_id": client_id, "extra_data": {"extra_pnginfo": {"workflow": workflow}}}
    request = urllib.request.Request(f"{url}/prompt", json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def gpu_processes() -> set[int]:
    if shutil.which("nvidia-smi") is None:
        return set()
    answer = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"], capture_output=True, text=True
    )
    return {int(line) for line in answer.stdout.split() if line.strip().isdigit()}


def wait(url: str, prompt_id: str, timeout_s: float, comfy_pid: int) -> tuple[dict, dict[int, float]]:
    deadline, seen = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        for pid in gpu_processes():
            seen.setdefault(pid, time.monotonic())
        entry = get_json(f"{url}/history/{prompt_id}").get(prompt_id)
        if entry and entry["status"].get("completed") is not None:
            return entry, seen
        time.sleep(1.0)
    raise SystemExit(f"prompt did not finish within {timeout_s:.0f} s")


def step_events(work: Path, run_name: str) -> list[dict]:
    (events,) = list(work.rglob(f"{run_name}/events.jsonl")) or [None]
    if events is None:
        return []
    return [json.loads(line) for line in events.read_text().splitlines() if line.strip()]


def summarise(events: list[dict], messages: list, started: float) -> dict:
    steps = [e for e in events if isinstance(e.get("step"), int)]
    kinds: dict[str, int] = {}
    for _, message in messages:
        kinds[message.get("type", "?")] = kinds.get(message.get("type", "?"), 0) + 1
    summary = {"step_events": len(steps), "ws_message_types": kinds}
    if len(steps) >= 4:
        timed = steps[2:]
        stamps = [e["time"] for e in timed if "time" in e]
        images = sum(e["img_per_s"] * e["step_s"] for e in timed[1:])
        if len(stamps) >= 2 and images:
            summary["img_per_s_wall_between_step_events"] = round(images / (stamps[-1] - stamps[0]), 3)
        summary["img_per_s_engine"] = [round(e["img_per_s"], 3) for e in timed if "img_per_s" in e][-3:]
        summary["loss_first_last"] = [steps[0].get("loss"), steps[-1].get("loss")]
        summary["peak_mem_gb"] = max((e.get("peak_mem_gb", 0) for e in steps), default=None)
    progress = [m for t, m in messages if m.get("type") == "progress"]
    summary["progress_messages"] = len(progress)
    summary["first_ws_message_after_s"] = round(messages[0][0] - started, 1) if messages else None
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tier", default="1x80GB")
    parser.add_argument("--train-steps", type=int, default=16)
    parser.add_argument("--sample-steps", type=int, default=8)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=420)
    parser.add_argument("--layers", type=int, default=None, help="main layers (default: the published 30)")
    parser.add_argument("--cpu", action="store_true", help="a rehearsal without a GPU (with --tier cpu)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    workflow = json.loads(workflow_path(args.tier).read_text(encoding="utf-8"))
    dit_name = next(n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "UNETLoader")
    size = next(n["widgets_values"][2] for n in workflow["nodes"] if n["type"] == "WhetstonePackDataset")
    result = {"tier": args.tier, "workflow": workflow_path(args.tier).name, "dit_file": dit_name}
    result["models"] = build_models(
        args.work, python, args.comfyui, dit_name, args.layers, "cpu" if args.cpu else "cuda"
    )
    image_folder = next(n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "WhetstonePackDataset")
    make_images(args.work / "input" / image_folder, args.images, size)
    log_path = args.out / "comfyui.log"
    process, url = start_comfyui(args.comfyui, python, args.work, log_path, args.cpu)
    try:
        prompt = workflow_api.to_api(workflow, get_json(f"{url}/object_info"))
        result["changes"] = substitute(prompt, args.train_steps, args.sample_steps)
        client_id = uuid.uuid4().hex
        listener = Events(url, client_id)
        listener.start()
        time.sleep(1.0)
        started = time.monotonic()
        status, answer = queue(url, workflow, prompt, client_id)
        if status != 200:
            raise SystemExit(f"ComfyUI refused the prompt ({status}): {json.dumps(answer)[:4000]}")
        entry, gpu_pids = wait(url, answer["prompt_id"], args.timeout, process.pid)
        result["prompt_wall_s"] = round(time.monotonic() - started, 1)
        listener.stop = True
        result["status"] = entry["status"]["status_str"]
        outputs = entry["outputs"]
        for class_type in (
            "WhetstonePackDataset",
            "WhetstoneTrainingPlan",
            "WhetstoneTrain",
            "WhetstoneLoadTrainedLoRA",
        ):
            key = node_id(prompt, class_type)
            result[class_type] = outputs.get(key, {}).get("text", [""])[0]
        result["gpu_processes"] = {"comfyui": process.pid, "seen": sorted(gpu_pids)}
        result["training_child_on_gpu"] = any(pid != process.pid for pid in gpu_pids)
        run_name = prompt[node_id(prompt, "WhetstoneTrain")]["inputs"]["run_name"]
        events = step_events(args.work, run_name)
        result["run"] = summarise(events, listener.messages, started)
        saved = outputs.get(node_id(prompt, "SaveImage"), {}).get("images", [])
        for image in saved:
            source = args.work / "output" / image["subfolder"] / image["filename"]
            shutil.copy2(source, args.out / image["filename"])
        result["saved_images"] = [image["filename"] for image in saved]
        if result["status"] != "success":
            errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
            result["errors"] = [f"{e.get('node_type')}: {e.get('exception_message')}" for e in errors]
    finally:
        process.terminate()
        process.wait(timeout=60)
    (args.out / "comfyui_gpu_workflow.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0 if result["status"] == "success" else 1


if __name__ == "__main__":
    raise SystemExit(main())
