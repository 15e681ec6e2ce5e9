"""Convert a UI-format workflow (workflows/*.json) to ComfyUI's API format, and optionally queue it.

``python -m tools.workflow_api "workflows/<name>.json" --server http://127.0.0.1:8188`` converts with the
server's ``/object_info`` (for widget names) and POSTs ``/prompt``; ComfyUI validates every node input before it
queues, so a 400 answer lists what is wrong. Without ``--server`` it prints the API prompt (needs ``--object-info``).
Frontend-only nodes (notes) are dropped; links become ``[source_id, slot]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
FRONTEND_ONLY = {"Note", "MarkdownNote"}
CONTROL = "control_after_generate"


def widget_names(info: dict) -> list[str]:
    """The node's widget inputs in the frontend's order, with the control widget after seed-like INTs."""
    names = []
    for section in ("required", "optional"):
        for name in info["input_order"].get(section, []):
            spec = info["input"][section][name]
            options = spec[1] if len(spec) > 1 else {}
            if not (isinstance(spec[0], list) or spec[0] in WIDGET_TYPES) or options.get("forceInput"):
                continue
            names.append(name)
            if spec[0] == "INT" and options.get(CONTROL, name in ("seed", "noise_seed")):
                names.append(CONTROL)
    return names


def to_api(workflow: dict, object_info: dict) -> dict:
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):
            continue
        if node["type"] not in object_info:
            raise ValueError(f"node {node['id']}: type {node['type']!r} is not registered on this server")
        names = widget_names(object_info[node["type"]])
        if len(names) != len(node["widgets_values"]):
            raise ValueError(f"node {node['id']} ({node['type']}): widgets {names}, values {node['widgets_values']}")
        inputs = {name: value for name, value in zip(names, node["widgets_values"], strict=True) if name != CONTROL}
        for slot in node["inputs"]:
            if slot.get("link") is not None:
                _, origin, origin_slot, *_ = links[slot["link"]]
                inputs[slot["name"]] = [str(origin), origin_slot]
        prompt[str(node["id"])] = {
            "class_type": node["type"],
            "inputs": inputs,
            "_meta": {"title": node.get("title", node["type"])},
        }
    return prompt


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())


def queue(server: str, workflow: dict, prompt: dict) -> tuple[int, dict]:
    body = {"prompt": prompt, "extra_data": {"extra_pnginfo": {"workflow": workflow}}}
    request = urllib.request.Request(
        f"{server}/prompt", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workflow", type=Path)
    parser.add_argument("--server", help="a running ComfyUI: convert with its /object_info and POST /prompt")
    parser.add_argument("--object-info", type=Path, help="an /object_info JSON file, to convert without a server")
    args = parser.parse_args(argv)
    workflow = json.loads(args.workflow.read_text(encoding="utf-8"))
    if args.server:
        server = args.server.rstrip("/")
        prompt = to_api(workflow, _get(f"{server}/object_info"))
        status, answer = queue(server, workflow, prompt)
        print(json.dumps({"status": status, **answer}, indent=1))
        return 0 if status == 200 else 1
    if not args.object_info:
        parser.error("give --server or --object-info")
    print(json.dumps(to_api(workflow, json.loads(args.object_info.read_text(encoding="utf-8"))), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
