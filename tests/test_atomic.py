"""Atomic writes: round trips, the old file kept and no temp file left on any error, parent folders made."""

import json
import os

import pytest

from training.atomic import atomic_write, write_bytes_atomic, write_json_atomic, write_text_atomic


def test_round_trips(tmp_path):
    write_bytes_atomic(tmp_path / "a.bin", b"\x00\x01")
    write_text_atomic(tmp_path / "b.txt", "ünï\ncode\n")
    write_json_atomic(tmp_path / "c.json", {"b": 1, "a": "é"}, sort_keys=True)
    atomic_write(str(tmp_path / "d.bin"), lambda file: file.write(b"streamed"), fsync=False)
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_bytes() == "ünï\ncode\n".encode()  # "\n" stays "\n" on every platform
    assert (tmp_path / "c.json").read_bytes() == b'{\n  "a": "\\u00e9",\n  "b": 1\n}\n'
    assert (tmp_path / "d.bin").read_bytes() == b"streamed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt", "c.json", "d.bin"]


def test_json_options_are_json_dumps_options(tmp_path):
    data = {"z": "é", "a": [1]}
    write_json_atomic(tmp_path / "m.json", data, ensure_ascii=False)
    expected = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    assert (tmp_path / "m.json").read_bytes() == expected.encode("utf-8")


def test_replaces_an_existing_file(tmp_path):
    path = tmp_path / "f.txt"
    write_text_atomic(path, "old")
    write_text_atomic(path, "new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_error_while_writing_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "f.bin"
    write_bytes_atomic(path, b"old")

    def half_then_fail(file):
        file.write(b"half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_error_in_fsync_or_rename_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    write_bytes_atomic(path, b"old")

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    for name in ("fsync", "replace"):
        with monkeypatch.context() as patch:
            patch.setattr(os, name, disk_full)
            with pytest.raises(OSError, match="No space left"):
                write_bytes_atomic(path, b"new")
        assert path.read_bytes() == b"old"
        assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_makes_parent_folders(tmp_path):
    path = tmp_path / "a" / "b" / "f.json"
    write_json_atomic(path, [1, 2])
    assert json.loads(path.read_text()) == [1, 2]


def test_temp_names_are_hidden_unique_and_end_in_tmp(tmp_path):
    seen = []

    def record(file):
        seen.append(os.path.basename(file.name))

    atomic_write(tmp_path / "f.bin", record)
    atomic_write(tmp_path / "f.bin", record)
    assert seen[0] != seen[1]
    assert all(name.startswith(f".f.bin.{os.getpid()}.") and name.endswith(".tmp") for name in seen)
