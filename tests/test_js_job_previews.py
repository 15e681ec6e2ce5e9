"""js/whetstone_job_previews.js under Node (skipped without `node`): the jobs panel card's preview strip and the
background Train node's steps (decodedSteps) take whatever the server answers, a field missing or of another type
included, without throwing (one card that threw took the whole jobs panel's list down), and show only our own image
route. The module's one import (ComfyUI's api.js) is a stub; `document` is a minimal DOM."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="needs Node.js")

DOM = """
class Element {
  constructor(tag) { this.tag = tag; this.children = []; this.style = {}; this.textContent = ""; }
  append(...children) { this.children.push(...children); }
}
globalThis.document = { createElement: (tag) => new Element(tag) };
const flat = (e) => ({ tag: e.tag, text: e.textContent, src: e.src, title: e.title, children: e.children.map(flat) });
const { previewStrip, decodedSteps } = await import("./extensions/whetstone/whetstone_job_previews.js");
const out = {};
"""

IMAGE = "/whetstone/jobs/preview_image?run=a&step=2&prompt=0&v=1"
CARDS = {
    "good": {"step": 2, "state": "decoded", "prompts": ["a cat", "a dog"], "images": [IMAGE, IMAGE], "message": ""},
    "images_a_string": {"step": 2, "state": "decoded", "images": "abc"},
    "images_an_object": {"step": 2, "state": "decoded", "images": {"0": IMAGE}},
    "prompts_a_string": {"step": 2, "state": "decoded", "prompts": "ab", "images": [IMAGE]},
    "nothing": {},
    "failed_message_object": {"step": 2, "state": "failed", "message": {"x": 1}},
    "step_a_string": {"step": "<b>2</b>", "state": "queued"},
    "foreign_url": {"step": 2, "state": "decoded", "images": ["https://elsewhere/x.png", 5, None, IMAGE]},
}
BODIES = {
    "good": {
        "steps": [{"step": 0, "state": "decoded", "prompts": ["a"], "images": [IMAGE]}, {"step": 2, "state": "queued"}]
    },
    "hostile_entries": {
        "steps": [
            None,
            5,
            "x",
            {"state": "decoded", "images": [IMAGE]},
            {"step": 1.5, "state": "decoded"},
            {"step": 3, "state": "decoded", "images": [IMAGE], "prompts": {"0": "a"}},
        ]
    },
    "known": {"steps": [{"step": 0, "state": "decoded", "images": [IMAGE]}]},
    "error": {"error": "no run 'x'"},
    "null": None,
    "steps_an_object": {"steps": {"0": {"step": 0}}},
}


def run_node(tmp_path: Path, script: str) -> dict:
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "api.js").write_text('export const api = { apiURL: (url) => "/api" + url };\n')
    pack = tmp_path / "extensions" / "whetstone"
    pack.mkdir(parents=True)
    shutil.copy(REPO / "js" / "whetstone_job_previews.js", pack)
    (tmp_path / "run.mjs").write_text(DOM + script + "\nconsole.log(JSON.stringify(out));\n")
    done = subprocess.run([NODE, "run.mjs"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def images_of(card: dict) -> list[dict]:
    return card["children"][-1]["children"]


def test_the_card_strip_takes_any_answer_without_throwing(tmp_path):
    script = "".join(
        f"try {{ out[{json.dumps(k)}] = flat(previewStrip({json.dumps(v)})); }} catch (e) {{ out[{json.dumps(k)}] = String(e); }}\n"
        for k, v in CARDS.items()
    )
    out = run_node(tmp_path, script)
    threw = {name: value for name, value in out.items() if isinstance(value, str)}
    assert not threw, threw
    good = out["good"]
    assert good["children"][0]["text"] == "previews at step 2"
    assert [(i["src"], i["title"]) for i in images_of(good)] == [("/api" + IMAGE, "a cat"), ("/api" + IMAGE, "a dog")]
    assert images_of(out["images_a_string"]) == [] and images_of(out["images_an_object"]) == []
    assert [i["title"] for i in images_of(out["prompts_a_string"])] == [""], "not a character of a string"
    assert out["nothing"]["children"][0]["text"] == "previews at step ?"
    assert out["failed_message_object"]["children"][1]["text"] == "not decoded"
    assert out["step_a_string"]["children"][0]["text"] == "previews at step ?: decoding…"
    assert [i["src"] for i in images_of(out["foreign_url"])] == ["/api" + IMAGE], "only our own route"


def test_the_nodes_steps_take_any_answer_without_throwing(tmp_path):
    script = "".join(
        f"try {{ out[{json.dumps(k)}] = decodedSteps({json.dumps(v)}, new Set({'[0]' if k == 'known' else '[]'})); }}"
        f" catch (e) {{ out[{json.dumps(k)}] = String(e); }}\n"
        for k, v in BODIES.items()
    )
    out = run_node(tmp_path, script)
    threw = {name: value for name, value in out.items() if isinstance(value, str)}
    assert not threw, threw
    assert out["good"] == {"added": [{"step": 0, "prompts": ["a"], "images": [{"url": IMAGE}]}], "decoding": True}
    assert out["hostile_entries"] == {
        "added": [{"step": 3, "prompts": [], "images": [{"url": IMAGE}]}],
        "decoding": False,
    }
    assert out["known"] == {"added": [], "decoding": False}, "a step the strip has is not added again"
    for name in ("error", "null", "steps_an_object"):
        assert out[name] == {"added": [], "decoding": False}, name
