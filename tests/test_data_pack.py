"""pack_dataset: outputs, captions, skips with reasons, fatal errors, determinism, interruption and resume, CLI."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.data_fixtures import make_dataset, noise_image, png_header_only, save_image, shard_bytes, write_caption
from training.data import cli
from training.data.encoders import TestLatentEncoder, TestTextEncoder
from training.data.pack import PackConfig, PackError, PackInterrupted, pack_dataset
from training.data.shards import read_samples, sha256_file

REPO_ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path, output="out", **overrides) -> PackConfig:
    settings = {"input_dir": tmp_path / "in", "output_dir": tmp_path / output, "resolution": 64, "store_image": True}
    return PackConfig(**(settings | overrides))


def _report(result) -> dict:
    return json.loads(result.report_path.read_text(encoding="utf-8"))


def _samples(result) -> dict[str, dict]:
    paths = [result.output_dir / shard.name for shard in result.shards]
    return {json.loads(s["json"])["source"]: s for s in read_samples(paths)}


def test_outputs_manifest_and_shard_layout(tmp_path):
    make_dataset(tmp_path / "in", 7)
    result = pack_dataset(_config(tmp_path, samples_per_shard=3, name="set"))
    assert [s.name for s in result.shards] == ["set-000000.tar", "set-000001.tar", "set-000002.tar"]
    assert [s.samples for s in result.shards] == [3, 3, 1]
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["samples"] == 7 and manifest["skipped"] == 0 and manifest["pack_version"] == 1
    assert manifest["buckets"] == {"48x80": 2, "64x64": 2, "80x48": 3}
    for shard in manifest["shards"]:
        assert shard["sha256"] == sha256_file(result.output_dir / shard["name"])
        assert shard["bytes"] == (result.output_dir / shard["name"]).stat().st_size
    assert manifest["settings"]["samples_per_shard"] == 3 and "output_dir" not in manifest["settings"]
    assert manifest["contents"]["latent_encoder"] is None and manifest["contents"]["image_format"] == "jpg"
    assert not list(result.output_dir.glob(".*"))  # no temp or state files left


def test_same_input_gives_byte_identical_output(tmp_path):
    make_dataset(tmp_path / "in", 6)
    encoders = {"latent_encoder": TestLatentEncoder(), "text_encoder": TestTextEncoder()}
    first = pack_dataset(_config(tmp_path, "a", samples_per_shard=4, num_threads=1), **encoders)
    second = pack_dataset(_config(tmp_path, "b", samples_per_shard=4, num_threads=2), **encoders)
    assert shard_bytes(first.output_dir) == shard_bytes(second.output_dir)


def test_encoded_pack_stores_the_empty_caption_features(tmp_path):
    from safetensors.torch import load_file

    from training.data.shards import EMPTY_CAPTION_KEY, EMPTY_CAPTION_NAME

    make_dataset(tmp_path / "in", 3)
    text_encoder = TestTextEncoder()
    encoded = pack_dataset(_config(tmp_path, "enc"), latent_encoder=TestLatentEncoder(), text_encoder=text_encoder)
    stored = load_file(encoded.output_dir / EMPTY_CAPTION_NAME)[EMPTY_CAPTION_KEY]
    expected = text_encoder.encode([""])[0].to(stored.dtype)
    assert stored.shape == expected.shape and torch.equal(stored, expected)
    raw = pack_dataset(_config(tmp_path, "raw"))
    assert not (raw.output_dir / EMPTY_CAPTION_NAME).exists()


def test_caption_sources_and_caption_problems(tmp_path):
    folder = tmp_path / "in"
    names = ["sidecar", "alt", "missing", "empty", "latin1", "long", "猫の写真"]
    paths = {name: save_image(folder / f"{name}.png", noise_image(64, 64, seed=i)) for i, name in enumerate(names)}
    write_caption(paths["sidecar"], "a red fox")
    write_caption(paths["alt"], "from the caption file", ".caption")
    write_caption(paths["empty"], "  \n")
    write_caption(paths["latin1"], "café".encode("latin-1"))
    write_caption(paths["long"], "word " * 3000)
    write_caption(paths["猫の写真"], "一只猫在睡觉 🐱")
    result = pack_dataset(_config(tmp_path, max_caption_chars=1000))
    captions = {source: s["txt"].decode("utf-8") for source, s in _samples(result).items()}
    assert captions["sidecar.png"] == "a red fox"
    assert captions["alt.png"] == "from the caption file"
    assert captions["missing.png"] == "" and captions["empty.png"] == ""
    assert len(captions["long.png"]) == 1000
    assert captions["猫の写真.png"] == "一只猫在睡觉 🐱"
    assert captions["latin1.png"] == "café"  # issue 13 defect 5: a Latin-1 caption no longer drops its image
    report = _report(result)
    assert report["skipped"] == []
    notes = {note["path"]: note for note in report["notes"]}
    assert set(notes) == {"missing.png", "empty.png", "long.png", "latin1.png"}
    assert "not UTF-8" in notes["latin1.png"]["note"] and notes["latin1.png"]["kind"] == "caption_decoding"
    keys = [s["__key__"] for s in _samples(result).values()]
    assert all(key.isascii() and "." not in key for key in keys) and len(set(keys)) == len(keys)


def test_missing_caption_skip_policy(tmp_path):
    save_image(tmp_path / "in" / "bare.png", noise_image(64, 64))
    make_dataset(tmp_path / "in", 1)
    result = pack_dataset(_config(tmp_path, missing_caption="skip"))
    assert result.samples == 1
    assert _report(result)["skipped"][0]["path"] == "bare.png"


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_metadata_file_captions(tmp_path, kind):
    folder = tmp_path / "in"
    save_image(folder / "sub" / "a.png", noise_image(64, 64))
    save_image(folder / "b.jpg", noise_image(64, 64, seed=1))
    write_caption(folder / "b.jpg", "sidecar loses to metadata")
    if kind == "jsonl":
        rows = [{"file_name": "sub/a.png", "text": "first"}, {"file_name": "b.jpg", "caption": "二"}]
        (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    else:
        (folder / "metadata.csv").write_text('file_name,text\nsub/a.png,first\nb.jpg,"二"\n', encoding="utf-8")
    captions = {k: s["txt"].decode() for k, s in _samples(pack_dataset(_config(tmp_path))).items()}
    assert captions == {"sub/a.png": "first", "b.jpg": "二"}


def test_bad_inputs_are_skipped_with_reasons(tmp_path):
    folder = tmp_path / "in"
    make_dataset(folder, 2)
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.webp").write_text("not an image")
    (folder / "bomb.png").write_bytes(png_header_only(50_000, 50_000))
    truncated = save_image(folder / "trunc.jpg", noise_image(100, 100))
    truncated.write_bytes(truncated.read_bytes()[:300])
    save_image(folder / "tiny.png", noise_image(16, 16))
    save_image(folder / "img000.jpg", noise_image(64, 64))  # duplicate stem of img000.png
    (folder / "notes.md").write_text("ignored: not an image extension")
    result = pack_dataset(_config(tmp_path))
    reasons = {entry["path"]: entry["reason"] for entry in _report(result)["skipped"]}
    assert result.samples == 2 and result.skipped == 6
    assert "0 bytes" in reasons["zero.png"]
    assert "unreadable" in reasons["text.webp"] and "unreadable" in reasons["trunc.jpg"]
    assert "decompression bomb" in reasons["bomb.png"]
    assert "too small" in reasons["tiny.png"]
    assert "duplicate stem" in reasons["img000.png"] or "duplicate stem" in reasons["img000.jpg"]


def test_no_usable_image_is_a_clear_error(tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(PackError, match="no image files"):
        pack_dataset(_config(tmp_path))
    (tmp_path / "in" / "broken.png").write_bytes(b"garbage")
    with pytest.raises(PackError, match=f"no usable image in {tmp_path / 'in'}"):
        pack_dataset(_config(tmp_path))
    assert json.loads((tmp_path / "out" / "report.json").read_text())["skipped"][0]["path"] == "broken.png"


def test_unwritable_or_nested_output_is_a_clear_error(tmp_path):
    make_dataset(tmp_path / "in", 1)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(PackError, match=f"output folder {tmp_path / 'a_file' / 'out'} is not writable"):
        pack_dataset(_config(tmp_path, output="a_file/out"))
    with pytest.raises(ValueError, match="output_dir=.* is inside input_dir"):
        _config(tmp_path, output="in/shards")
    if os.geteuid() != 0:  # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(PackError, match="not writable"):
            pack_dataset(_config(tmp_path, output="locked/out"))


@pytest.mark.parametrize(
    ("field", "value"),
    [("samples_per_shard", 0), ("resolution", 100), ("too_small", "grow"), ("background", (0, 0)), ("name", "a.b")],
)
def test_config_validation_names_the_field(tmp_path, field, value):
    (tmp_path / "in").mkdir()
    with pytest.raises(ValueError, match=f"PackConfig.{field}"):
        _config(tmp_path, **{field: value})


def test_no_image_data_is_rejected(tmp_path):
    make_dataset(tmp_path / "in", 1)
    with pytest.raises(ValueError, match="store_image=False and no latent_encoder"):
        pack_dataset(_config(tmp_path, store_image=False))


def test_should_stop_then_resume_gives_identical_bytes(tmp_path):
    make_dataset(tmp_path / "in", 10)
    reference = pack_dataset(_config(tmp_path, "reference", samples_per_shard=3))
    calls = []
    with pytest.raises(PackInterrupted, match="run it again"):
        pack_dataset(
            _config(tmp_path, samples_per_shard=3),
            should_stop=lambda: len(calls) >= 1,
            progress=lambda done, total: calls.append(done) if done >= 8 else None,
        )
    visible = sorted(p.name for p in (tmp_path / "out").glob("*.tar"))
    assert visible == ["data-000000.tar", "data-000001.tar"]  # the third shard was in progress and is discarded
    assert not list((tmp_path / "out").glob(".*.tmp"))
    progress = []
    resumed = pack_dataset(_config(tmp_path, samples_per_shard=3), progress=lambda d, t: progress.append((d, t)))
    assert resumed.reused_shards == 2 and progress[0] == (6, 10) and progress[-1] == (10, 10)
    assert shard_bytes(resumed.output_dir) == shard_bytes(reference.output_dir)
    again = pack_dataset(_config(tmp_path, samples_per_shard=3))  # already complete: verified, nothing rewritten
    assert again.reused_shards == 4


_KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
from training.data.pack import PackConfig, pack_dataset
def die_midway(done, total):
    if done == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
config = PackConfig(input_dir=Path(sys.argv[1]), output_dir=Path(sys.argv[2]), resolution=64, store_image=True,
                    samples_per_shard=3)
pack_dataset(config, progress=die_midway)
"""


def test_killed_pack_leaves_no_partial_shard_and_rerun_matches(tmp_path):
    make_dataset(tmp_path / "in", 10)
    # A damaged-on-disk earlier shard must be rewritten too: corrupt one after the kill.
    process = subprocess.run(
        [sys.executable, "-c", _KILL_SCRIPT, str(tmp_path / "in"), str(tmp_path / "out"), "8"],
        cwd=REPO_ROOT,
        env=os.environ | {"PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
    )
    assert process.returncode == -9, process.stderr.decode()
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.tar")) == ["data-000000.tar", "data-000001.tar"]
    assert not (out / "manifest.json").exists()
    (out / "data-000001.tar").write_bytes(b"damaged")
    resumed = pack_dataset(_config(tmp_path, samples_per_shard=3))
    assert resumed.reused_shards == 1
    reference = pack_dataset(_config(tmp_path, "reference", samples_per_shard=3))
    assert shard_bytes(out) == shard_bytes(reference.output_dir)


def test_rerun_with_other_settings_is_refused(tmp_path):
    make_dataset(tmp_path / "in", 2)
    pack_dataset(_config(tmp_path))
    with pytest.raises(PackError, match="already holds a pack"):
        pack_dataset(_config(tmp_path, resolution=128, too_small="upscale"))


def _run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_pack_and_inspect(tmp_path, capsys):
    make_dataset(tmp_path / "in", 5)
    assert (
        _run_cli("pack", str(tmp_path / "in"), str(tmp_path / "out"), "--resolution", "64", "--samples-per-shard", "2")
        == 0
    )
    assert "packed 5 samples into 3 shards" in capsys.readouterr().out
    assert _run_cli("inspect", str(tmp_path / "out"), "--samples", "2") == 0
    summary = capsys.readouterr().out
    assert "5 samples in 3 shards" in summary and "80x48: 2" in summary
    assert summary.count("\nsample ") == 2 and "image=80x48 JPEG" in summary
    assert _run_cli("pack", str(tmp_path / "in"), str(tmp_path / "in" / "x")) == 2
    assert "inside input_dir" in capsys.readouterr().err
    assert _run_cli("inspect", str(tmp_path / "nowhere")) == 2
