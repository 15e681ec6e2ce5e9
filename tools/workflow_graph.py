"""A small schema-0.4 UI workflow builder: the model files the loaders name, nodes, links, and the frontend's geometry.

``tools.workflow_pipeline`` lays the Whetstone pipeline out on it; ``tools.make_workflows`` writes the files.
"""

from __future__ import annotations

import json
import math

PACK_VERSION = "0.1.0"
COMFY_VERSION = "0.8.0"

BASE_MODEL = "z_image_bf16.safetensors"  # Comfy-Org's name for Z-Image-Base in bf16
TEXT_ENCODER = "qwen_3_4b.safetensors"
VAE = "ae.safetensors"
CLIP_TYPE = "lumina2"  # ComfyUI 0.8 loads Qwen3-4B as Z-Image's text encoder under this CLIPLoader type

#: Where each model file comes from and the ComfyUI models folder it goes in: the loaders' ``properties.models``,
#: which the frontend's missing-models dialog offers to download (``zModelFile``: name, url, directory). The text
#: encoder and VAE URLs are those of ComfyUI's own Z-Image template (comfyui_workflow_templates, image_z_image_turbo);
#: the Base diffusion model is Comfy-Org's repackaged Z-Image repository.
MODEL_FILES = {
    BASE_MODEL: (
        "diffusion_models",
        "https://huggingface.co/Comfy-Org/z_image/resolve/main/split_files/diffusion_models/z_image_bf16.safetensors",
    ),
    TEXT_ENCODER: (
        "text_encoders",
        "https://huggingface.co/Comfy-Org/z_image_turbo/resolve/main/split_files/text_encoders/qwen_3_4b.safetensors",
    ),
    VAE: ("vae", "https://huggingface.co/Comfy-Org/z_image_turbo/resolve/main/split_files/vae/ae.safetensors"),
}


# ---------------------------------------------------------------------------------------------------------------------
# the graph builder


class Graph:
    """Builds a schema-0.4 UI workflow: nodes with socket inputs/outputs and the links between them."""

    def __init__(self) -> None:
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def node(self, type_: str, size, widgets, *, inputs=(), outputs=(), title=None, ours=False) -> dict:
        """A node of ``size`` (its largest: after a run has filled its text panels); ``layout`` places it."""
        node = {
            "id": len(self.nodes) + 1,
            "type": type_,
            "pos": [0, 0],
            "size": list(size),
            "flags": {},
            "order": 0,
            "mode": 0,
            "inputs": [{"name": name, "type": kind, "link": None} for name, kind in inputs],
            "outputs": [
                {"name": name, "type": kind, "links": [], "slot_index": index}
                for index, (name, kind) in enumerate(outputs)
            ],
            "properties": _properties(type_, ours),
            "widgets_values": list(widgets),
        }
        if title:
            node["title"] = title
        models = [
            {"name": value, "url": MODEL_FILES[value][1], "directory": MODEL_FILES[value][0]}
            for value in widgets
            if isinstance(value, str) and value in MODEL_FILES and type_ in MODEL_LOADERS
        ]
        if models:
            node["properties"]["models"] = models
        self.nodes.append(node)
        return node

    def link(self, source: dict, output: str, target: dict, input_: str) -> None:
        slot = next(i for i, o in enumerate(source["outputs"]) if o["name"] == output)
        target_slot = next(i for i, o in enumerate(target["inputs"]) if o["name"] == input_)
        kind = source["outputs"][slot]["type"]
        link_id = len(self.links) + 1
        self.links.append([link_id, source["id"], slot, target["id"], target_slot, kind])
        source["outputs"][slot]["links"].append(link_id)
        target["inputs"][target_slot]["link"] = link_id

    def workflow(self) -> dict:
        self._order()
        return {
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": self.nodes,
            "links": self.links,
            "groups": [],
            "config": {},
            "extra": {"ds": {"scale": 0.6, "offset": [60, 60]}},
            "version": 0.4,
        }

    def _order(self) -> None:
        """``order``: a topological execution order, as the frontend saves it."""
        parents = {n["id"]: {link[1] for link in self.links if link[3] == n["id"]} for n in self.nodes}
        done: list[int] = []
        while len(done) < len(self.nodes):
            ready = [i for i, p in parents.items() if i not in done and p <= set(done)]
            done.extend(sorted(ready))
        for node in self.nodes:
            node["order"] = done.index(node["id"])


#: The core loaders whose file widget names a model in MODEL_FILES.
MODEL_LOADERS = ("UNETLoader", "CLIPLoader", "VAELoader")


def _properties(type_: str, ours: bool) -> dict:
    if type_ in ("Note", "MarkdownNote"):
        return {}
    if ours:
        return {"Node name for S&R": type_, "cnr_id": "comfyui-whetstone", "ver": PACK_VERSION}
    return {"Node name for S&R": type_, "cnr_id": "comfy-core", "ver": COMFY_VERSION}


def render(workflow: dict) -> str:
    """The workflow file's text, as written to ``workflows/``."""
    return json.dumps(workflow, indent=2, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# sizes and layout: the frontend's geometry (litegraph), so that no node covers another, before or after a run

TITLE_HEIGHT = 30  # litegraph draws the title bar above ``pos``
SLOT_HEIGHT = 20
WIDGET_HEIGHT = 24  # a 20 px widget and its 4 px spacing
GAP = 40
CHAR_WIDTH = 6.1  # js/whetstone.js text panels: 10 px monospace
TEXT_LINE_HEIGHT = 13
TEXT_MAX_HEIGHT = 260  # the panel scrolls beyond this (js/whetstone.js TEXT_MAX_HEIGHT)
DOM_MARGIN = 10
CHART_HEIGHT = 190
#: Lines that fill a text panel to its maximum height: what the layout reserves for reports whose length is not
#: known here (pack and train); they wrap at the node's width (js/whetstone.js), so they never widen it.
REPORT_LINES = 20
#: The Load Trained LoRA report: one line, wrapped at the node's width.
LORA_REPORT_LINES = 4
#: Sockets a node may gain without moving its neighbours (room for one more input or output row).
SPARE_SLOTS = 1


def text_panel_height(lines: int) -> int:
    """The text panel's height in js/whetstone.js ``textPanelHeight`` for a text of ``lines`` lines."""
    return min(TEXT_MAX_HEIGHT, lines * TEXT_LINE_HEIGHT + 8 + 16) + 2 * DOM_MARGIN


def text_panel_width(chars: int) -> int:
    return math.ceil(chars * CHAR_WIDTH) + 8 + 16 + 2 * DOM_MARGIN


def node_height(slots: int, widgets: int, panels: int = 0) -> int:
    return (slots + SPARE_SLOTS) * SLOT_HEIGHT + widgets * WIDGET_HEIGHT + panels + 12


def layout(columns: list[list[dict]], top: int = 0) -> None:
    """Place columns left to right and their nodes top to bottom, ``GAP`` apart counting the title bars."""
    x = 0
    for column in columns:
        y = top + TITLE_HEIGHT
        for node in column:
            node["pos"] = [x, y]
            y += node["size"][1] + GAP + TITLE_HEIGHT
        x += max(node["size"][0] for node in column) + GAP


def rectangle(node: dict) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of a node including its title bar."""
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE_HEIGHT, x + w, y + h
