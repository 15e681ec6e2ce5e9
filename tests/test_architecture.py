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


#: The size rule of the project brief (files under ~400 lines, functions under ~60), with room for wrapping.
MAX_FILE_LINES = 420
MAX_FUNCTION_LINES = 70


def oversized(root: Path) -> list[str]:
    """Files of ``root`` over MAX_FILE_LINES and functions (methods and nested ones too, decorators included) over
    MAX_FUNCTION_LINES, each with its length."""
    found = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        name = Path(root.name, path.relative_to(root))
        if len(text.splitlines()) > MAX_FILE_LINES:
            found.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                if node.end_lineno - start + 1 > MAX_FUNCTION_LINES:
                    found.append(f"{name}:{node.lineno} {node.name}(): {node.end_lineno - start + 1} lines")
    return found


def test_training_files_and_functions_stay_small():
    found = oversized(ROOT / "training")
    assert not found, "split these along a real seam (docs/architecture.md):\n" + "\n".join(found)


def test_the_size_rule_sees_long_files_and_functions(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "long.py").write_text(f"@staticmethod\ndef long():\n{body}\n\n\ndef short():\n    pass\n")
    (tmp_path / "big.py").write_text("x = 1\n" * (MAX_FILE_LINES + 1))
    (tmp_path / "fine.py").write_text("x = 1\n" * MAX_FILE_LINES)
    assert oversized(tmp_path) == [
        f"{tmp_path.name}/big.py: {MAX_FILE_LINES + 1} lines",
        f"{tmp_path.name}/long.py:2 long(): {MAX_FUNCTION_LINES + 2} lines",
    ]
