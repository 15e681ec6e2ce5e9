"""Path confinement, name checks and widget validation: hostile input is refused before anything is written."""

from __future__ import annotations

import math
import os

import pytest
from test_nodes_support import install_fake_comfy, pack_module, snapshot_files

paths = pack_module("nodes.paths")
validation = pack_module("nodes.validation")

HOSTILE_PATHS = [
    "../../etc",
    "images/../../secret",
    "..",
    "/etc",
    "/",
    "$(rm -rf ~)",
    "`id`",
    "a;rm -rf /",
    "a && b",
    "a | b",
    "x > /tmp/y",
    "x\x00y",
    "~/images",
    "a\nb",
    "",
    "   ",
    "x" * 5000,
]
HOSTILE_NAMES = [
    "../x",
    "..",
    "a/b",
    "/abs",
    "a b",
    "a;rm",
    "$(id)",
    "-rf",
    ".hidden",
    "x" * 65,
    "",
    "naïve",
    "a..b",
    "C:\\evil",
]


@pytest.fixture
def comfy(tmp_path, monkeypatch):
    return install_fake_comfy(tmp_path, monkeypatch)


@pytest.mark.parametrize("value", HOSTILE_PATHS)
def test_hostile_paths_are_refused_with_the_field_name(comfy, value):
    with pytest.raises(paths.PathRefused, match="image_folder"):
        paths.confine(value, paths.image_roots(), "image_folder", must_exist=False)


@pytest.mark.parametrize("value", HOSTILE_NAMES)
def test_hostile_names_are_refused(comfy, value):
    with pytest.raises(paths.PathRefused, match="dataset_name"):
        paths.new_child(paths.dataset_roots(), value, "dataset_name")


def test_relative_and_absolute_paths_inside_the_roots_are_accepted(comfy):
    images = comfy.folders["input"] / "my images (2024)"
    images.mkdir()
    assert paths.confine("my images (2024)", paths.image_roots(), "f", must_exist=True) == images.resolve()
    assert paths.confine(str(images), paths.image_roots(), "f", must_exist=True) == images.resolve()
    out_images = comfy.folders["output"] / "renders"
    out_images.mkdir()
    assert paths.confine("renders", paths.image_roots(), "f", must_exist=True) == out_images.resolve()


@pytest.mark.parametrize("value", ["x" * 300, "sub/" + "y" * 256, "z" * 200 + "é" * 30])
@pytest.mark.parametrize("must_exist", [True, False])
def test_a_path_part_longer_than_a_file_name_can_be_is_refused_not_raised(comfy, value, must_exist):
    """Regression: a part over 255 bytes made Path.exists() raise OSError (ENAMETOOLONG), a traceback for the user."""
    with pytest.raises(paths.PathRefused, match="image_folder.*255 bytes"):
        paths.confine(value, paths.image_roots(), "image_folder", must_exist=must_exist)


def test_missing_folder_names_the_roots(comfy):
    with pytest.raises(paths.PathRefused, match="not found"):
        paths.confine("nowhere", paths.image_roots(), "image_folder", must_exist=True)


def test_symlink_escaping_the_root_is_refused(comfy, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, comfy.folders["input"] / "link")
    with pytest.raises(paths.PathRefused, match="image_folder"):
        paths.confine("link", paths.image_roots(), "image_folder", must_exist=True)


def test_absolute_path_outside_is_refused_even_if_it_exists(comfy, tmp_path):
    with pytest.raises(paths.PathRefused, match="outside"):
        paths.confine(str(tmp_path), paths.image_roots(), "image_folder", must_exist=True)


def test_new_child_lies_in_the_first_root(comfy):
    assert paths.new_child(paths.run_roots(), "run-1.v2", "run_name") == (comfy.folders["whetstone_runs"] / "run-1.v2")


@pytest.mark.parametrize(
    "widget, value",
    [
        (validation.Int(1, 1, 10, "t"), 10**12),
        (validation.Int(1, 1, 10, "t"), -1),
        (validation.Int(1, 1, 10, "t"), True),
        (validation.Int(1, 1, 10, "t"), 1.5),
        (validation.Int(1, 1, 10, "t"), "5"),
        (validation.Float(1.0, 0.0, 1.0, "t"), math.nan),
        (validation.Float(1.0, 0.0, 1.0, "t"), math.inf),
        (validation.Float(1.0, 0.0, 1.0, "t"), 1e308),
        (validation.Choice(("a", "b"), "t"), "c; rm -rf /"),
        (validation.Text("", "t", max_chars=8), "x" * 9),
        (validation.Toggle(False, "t"), "yes"),
    ],
)
def test_widget_values_outside_their_range_are_refused(widget, value):
    with pytest.raises(validation.SettingRefused, match="setting"):
        widget.check("setting", value)


def test_check_all_refuses_missing_inputs():
    with pytest.raises(validation.SettingRefused, match="missing"):
        validation.check_all({"a": validation.Int(1, 0, 2, "t")}, {})


def test_refused_pack_writes_nothing(comfy):
    pack_node = pack_module("nodes.pack_node")
    (comfy.folders["input"] / "my_images").mkdir()
    (comfy.folders["input"] / "my_images" / "a.png").write_bytes(b"not really a png")
    before = snapshot_files(comfy.root)
    settings = {name: widget.default for name, widget in pack_node.WIDGETS.items()}
    hostile = [
        {"image_folder": "../../etc"},
        {"image_folder": "/etc"},
        {"dataset_name": "../../escape"},
        {"dataset_name": "x; rm -rf /"},
        {"resolution": 10**9},
        {"samples_per_shard": 0},
        {"too_small": "explode"},
    ]
    for override in hostile:
        with pytest.raises(ValueError) as refused:
            pack_node.PackDataset().pack(**{**settings, **override})
        assert next(iter(override)) in str(refused.value)
    assert snapshot_files(comfy.root) == before
