"""Pin the ComfyUI core nodes our workflows use: ``GET /object_info`` of a running ComfyUI, trimmed to those nodes.

``python -m tools.pin_object_info http://127.0.0.1:8188`` rewrites ``tests/data/comfyui_object_info.json``, which
``tests/test_workflows.py`` checks the workflows against without a ComfyUI. Tooltips are dropped; file lists (model
combos) are emptied, since they list whatever the pinning machine had in its model folders.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PINNED = ROOT / "tests" / "data" / "comfyui_object_info.json"
CORE_NODES = (
    "UNETLoader",
    "CLIPLoader",
    "VAELoader",
    "CLIPTextEncode",
    "EmptySD3LatentImage",
    "KSampler",
    "VAEDecode",
    "SaveImage",
    "PreviewImage",
)
#: Model-file combos: emptied when pinning (any file name is valid in a workflow; user folders differ).
FILE_INPUTS = {("UNETLoader", "unet_name"), ("CLIPLoader", "clip_name"), ("VAELoader", "vae_name")}
#: Nodes the frontend defines itself (not in /object_info): their widgets, in order.
FRONTEND_ONLY = {"Note": ["text"], "MarkdownNote": ["text"]}
KEPT = ("input", "input_order", "output", "output_name", "output_is_list", "python_module", "category")


def trim(name: str, info: dict) -> dict:
    node = {key: info[key] for key in KEPT if key in info}
    node["input"].pop("hidden", None)
    node.get("input_order", {}).pop("hidden", None)
    for inputs in node["input"].values():
        for input_name, spec in inputs.items():
            options = {k: v for k, v in (spec[1] if len(spec) > 1 else {}).items() if k != "tooltip"}
            kind = [] if (name, input_name) in FILE_INPUTS else spec[0]
            inputs[input_name] = [kind, options] if options else [kind]
    return node


def pin(url: str) -> dict:
    with urllib.request.urlopen(f"{url.rstrip('/')}/object_info", timeout=60) as response:
        info = json.loads(response.read())
    with urllib.request.urlopen(f"{url.rstrip('/')}/system_stats", timeout=60) as response:
        version = json.loads(response.read())["system"]["comfyui_version"]
    missing = [name for name in CORE_NODES if name not in info]
    if missing:
        raise SystemExit(f"{url} has no {missing}; is it ComfyUI >= 0.8?")
    return {
        "_about": f"GET /object_info of ComfyUI {version}, trimmed by tools/pin_object_info.py",
        "comfyui_version": version,
        "frontend_only": FRONTEND_ONLY,
        "nodes": {name: trim(name, info[name]) for name in CORE_NODES},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="a running ComfyUI, e.g. http://127.0.0.1:8188")
    args = parser.parse_args(argv)
    PINNED.parent.mkdir(parents=True, exist_ok=True)
    PINNED.write_text(json.dumps(pin(args.url), indent=1) + "\n", encoding="utf-8")
    print(f"written: {PINNED.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
