"""Importing the pack the way ComfyUI does, and a fake ComfyUI for the node tests (this module holds no tests).

How the node tests import the pack: ComfyUI imports the repository folder as a *package* (named after its path), and
the pack imports itself relatively (`from .nodes import ...`, `from ..training import ...`). A plain `import nodes`
would pick the wrong module (ComfyUI has a `nodes.py`) and would not exercise the relative imports, so `load_pack()`
loads the repository root as a package under `PACK_MODULE` with `spec_from_file_location(...,
submodule_search_locations=[root])`, exactly like ComfyUI's `load_custom_node`, and caches it in `sys.modules`.
Submodules are then `importlib.import_module(f"{PACK_MODULE}.nodes.paths")`, or `pack_module("nodes.paths")`.

`install_fake_comfy` replaces the functions of `nodes/comfy_bridge.py` (the only module touching ComfyUI) with fakes
rooted in a temporary folder: input/output folders, whetstone_datasets, whetstone_runs, loras, diffusion_models, a
recording progress bar, an interrupt flag the test controls, and a list of sent websocket events.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_MODULE = "comfyui_whetstone_under_test"


def load_pack():
    """The repository root imported as a package, as ComfyUI imports custom_nodes/ComfyUI-Whetstone."""
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    spec = importlib.util.spec_from_file_location(
        PACK_MODULE, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PACK_MODULE]
        raise
    return module


def pack_module(relative_name: str):
    """A submodule of the loaded pack, e.g. pack_module("nodes.paths")."""
    load_pack()
    return importlib.import_module(f"{PACK_MODULE}.{relative_name}")


class FakeInterrupt(Exception):
    """Stands in for comfy.model_management.InterruptProcessingException."""


class FakeProgressBar:
    def __init__(self, fake: FakeComfy, total: int, node_id) -> None:
        self.fake = fake
        self.total = total
        self.node_id = node_id

    def update_absolute(self, value, total=None, preview=None) -> None:
        if self.fake.interrupted:  # the real hook raises on every update once Cancel was pressed
            self.fake.interrupted = False
            raise FakeInterrupt()
        self.total = total if total is not None else self.total
        self.fake.progress.append((value, self.total))


@dataclass
class FakeComfy:
    root: Path
    interrupted: bool = False
    interrupt_after_progress: int | None = None  # set interrupted once this many progress updates were recorded
    progress: list = field(default_factory=list)
    events: list = field(default_factory=list)
    unloads: int = 0

    @property
    def folders(self) -> dict[str, Path]:
        names = ("input", "output", "whetstone_datasets", "whetstone_runs", "loras", "diffusion_models", "vae")
        return {name: self.root / name for name in names}

    def interrupt_requested(self) -> bool:
        if self.interrupt_after_progress is not None and len(self.progress) >= self.interrupt_after_progress:
            self.interrupted = True
            self.interrupt_after_progress = None
        return self.interrupted

    def raise_if_interrupted(self) -> None:
        if self.interrupted:
            self.interrupted = False
            raise FakeInterrupt()

    def full_path(self, folder_name: str, filename: str) -> Path:
        path = self.folders[folder_name] / filename
        if ".." in Path(filename).parts or not path.is_file():
            raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
        return path

    def list_files(self, folder_name: str) -> list[str]:
        folder = self.folders[folder_name]
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def install_fake_comfy(tmp_path: Path, monkeypatch) -> FakeComfy:
    """Point nodes/comfy_bridge.py at folders under tmp_path/comfy; returns the fake to drive and inspect."""
    bridge = pack_module("nodes.comfy_bridge")
    fake = FakeComfy(root=tmp_path / "comfy")
    for folder in fake.folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(bridge, "comfyui_present", lambda: True)
    monkeypatch.setattr(bridge, "input_directory", lambda: fake.folders["input"])
    monkeypatch.setattr(bridge, "output_directory", lambda: fake.folders["output"])
    monkeypatch.setattr(bridge, "folder_roots", lambda name: [fake.folders[name]])
    monkeypatch.setattr(bridge, "list_files", fake.list_files)
    monkeypatch.setattr(bridge, "full_path", fake.full_path)
    monkeypatch.setattr(bridge, "progress_bar", lambda total, node_id=None: FakeProgressBar(fake, total, node_id))
    monkeypatch.setattr(bridge, "interrupt_requested", fake.interrupt_requested)
    monkeypatch.setattr(bridge, "raise_if_interrupted", fake.raise_if_interrupted)
    monkeypatch.setattr(bridge, "send_event", lambda event, data: fake.events.append((event, data)))
    monkeypatch.setattr(bridge, "unload_models", lambda: setattr(fake, "unloads", fake.unloads + 1))
    monkeypatch.setattr(bridge, "process_latent_in", lambda latents: (latents - 0.1159) * 0.3611)
    return fake


def snapshot_files(root: Path) -> set[str]:
    """Every path below root (files and folders), to prove a refused call wrote nothing."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}
