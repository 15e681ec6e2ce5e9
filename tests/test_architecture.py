"""The layers of docs/architecture.md, enforced: each folder of training/ imports only the layers below it
(command-line modules, ``*/cli.py``, and ``apps/`` are entry points and may import any layer); nothing in training/
imports ComfyUI or the nodes; ComfyUI is imported only in nodes/comfy_bridge.py."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Each layer may import the ones listed (the root modules atomic.py, vocabulary.py, lock.py import nothing of ours).
ALLOWED = {
    "atomic": set(),
    "vocabulary": set(),
    "lock": set(),
    "model": {"atomic", "vocabulary"},
    "data": {"atomic", "vocabulary", "lock"},
    "hardware": {"atomic", "vocabulary", "model", "data"},
    "run": {"atomic", "vocabulary", "lock", "hardware"},
    "engine": {"atomic", "vocabulary", "lock", "model", "data", "hardware", "run"},
    "apps": {"atomic", "vocabulary", "lock", "model", "data", "hardware", "run", "engine"},
}
ENTRY_POINTS = {"cli.py", "__main__.py", "demo_cli.py", "preview_cli.py"}


def imported_layers(path: Path) -> set[str]:
    """The training/ layers a module imports (relative or absolute ``training.x`` imports)."""
    package = path.relative_to(ROOT).parts[:-1]
    layers = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            target = [*package[: len(package) - node.level + 1], *(node.module or "").split(".")]
            layers.add(target[1] if len(target) > 1 and target[1] else "(package)")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("training."):
            layers.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            layers |= {a.name.split(".")[1] for a in node.names if a.name.startswith("training.")}
    return layers


def layer_of(path: Path) -> str:
    parts = path.relative_to(ROOT / "training").parts
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


def test_each_layer_imports_only_the_layers_below_it():
    wrong = []
    for path in sorted((ROOT / "training").rglob("*.py")):
        layer = layer_of(path)
        if path.name in ENTRY_POINTS or layer not in ALLOWED:
            continue
        extra = imported_layers(path) - ALLOWED[layer] - {layer, "(package)"}
        if extra:
            wrong.append(f"{path.relative_to(ROOT)} ({layer}) imports {sorted(extra)}")
    assert not wrong, "\n".join(wrong)


COMFY_MODULES = ("comfy", "folder_paths", "server", "nodes")


def absolute_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    modules = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
    return modules | {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}


def test_comfyui_stays_behind_the_bridge():
    for path in sorted((ROOT / "training").rglob("*.py")):
        assert not {m.split(".")[0] for m in absolute_imports(path)} & set(COMFY_MODULES), path
    for path in sorted((ROOT / "nodes").glob("*.py")):
        if path.name != "comfy_bridge.py":
            assert not {m.split(".")[0] for m in absolute_imports(path)} & set(COMFY_MODULES[:3]), path


def test_the_documented_layers_are_the_enforced_ones():
    page = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    for layer in ALLOWED:
        assert f"`{layer}" in page, f"docs/architecture.md does not describe {layer}"
