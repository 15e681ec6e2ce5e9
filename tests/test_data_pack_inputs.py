"""Every input is packed or reported (issue 13 defects 3 and 4): bad names, broken and outside links, files vanishing
while packing, formats and folders named like images; and a refused rerun says what changed."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from tests.data_fixtures import make_dataset, noise_image, save_image, write_caption
from training.data import cli
from training.data.pack import PackConfig, PackError, PackInterrupted, pack_dataset
from training.data.shards import read_samples


def _config(tmp_path, output="out", **overrides) -> PackConfig:
    settings = {"input_dir": tmp_path / "in", "output_dir": tmp_path / output, "resolution": 64, "store_image": True}
    return PackConfig(**(settings | overrides))


def _report(result) -> dict:
    return json.loads(result.report_path.read_text(encoding="utf-8"))


def _skips(result) -> dict[str, dict]:
    return {entry["path"]: entry for entry in _report(result)["skipped"]}


def _notes(result) -> dict[str, dict]:
    return {entry["path"]: entry for entry in _report(result)["notes"]}


def _captions(result) -> dict[str, str]:
    paths = [result.output_dir / shard.name for shard in result.shards]
    return {json.loads(s["json"])["source"]: s["txt"].decode("utf-8") for s in read_samples(paths)}


def _outside_image(tmp_path, name="secret.png") -> Path:
    path = save_image(tmp_path / "elsewhere" / name, noise_image(64, 64, seed=9))
    write_caption(path, "a caption from outside")
    return path


# --- defect 3: one bad entry no longer aborts the pack ----------------------------------------------------------------


def test_non_utf8_file_name_is_a_reported_skip(tmp_path):
    make_dataset(tmp_path / "in", 2)
    raw_name = os.fsencode(tmp_path / "in") + b"/caf\xe9.png"
    with open(raw_name, "wb") as file:
        file.write((tmp_path / "in" / "img000.png").read_bytes())
    result = pack_dataset(_config(tmp_path))
    assert result.samples == 2
    skip = _skips(result)["caf\\xe9.png"]
    assert skip["kind"] == "bad_name" and "not valid UTF-8" in skip["reason"] and "rename" in skip["reason"]


def test_broken_symlink_is_a_reported_skip(tmp_path):
    make_dataset(tmp_path / "in", 2)
    os.symlink(tmp_path / "gone.png", tmp_path / "in" / "dangling.png")
    result = pack_dataset(_config(tmp_path))
    assert result.samples == 2
    assert _skips(result)["dangling.png"]["kind"] == "broken_link"
    assert "broken symbolic link" in _skips(result)["dangling.png"]["reason"]


def test_file_deleted_while_packing_is_skipped_and_the_rerun_says_what_changed(tmp_path):
    make_dataset(tmp_path / "in", 9)
    victim = tmp_path / "in" / "img008.png"

    def delete_after_listing(done, total):
        if done == 0:  # called once before any image is read, after the folder was listed
            victim.unlink()

    result = pack_dataset(_config(tmp_path, num_threads=1), progress=delete_after_listing)
    assert result.samples == 8
    skip = _skips(result)["img008.png"]
    assert skip["kind"] == "unreadable_file" and "FileNotFoundError" in skip["reason"]
    with pytest.raises(PackError, match="1 file removed: img008.png") as refused:
        pack_dataset(_config(tmp_path))
    assert "usable as it is" in str(refused.value) and "delete" in str(refused.value)


def test_interrupted_pack_of_a_changed_folder_names_the_changes_and_how_to_continue(tmp_path):
    make_dataset(tmp_path / "in", 8)
    with pytest.raises(PackInterrupted):
        pack_dataset(
            _config(tmp_path, samples_per_shard=2),
            should_stop=lambda: len(list((tmp_path / "out").glob("*.tar"))) >= 1,
        )
    (tmp_path / "in" / "img005.png").unlink()
    save_image(tmp_path / "in" / "new.png", noise_image(64, 64))
    with open(tmp_path / "in" / "img001.png", "ab") as grown:
        grown.write(b"\0")
    with pytest.raises(PackError) as refused:
        pack_dataset(_config(tmp_path, samples_per_shard=2, resolution=80))
    message = str(refused.value)
    assert "interrupted pack" in message and "setting resolution: 64 -> 80" in message
    assert "1 file removed: img005.png" in message and "1 file added: new.png" in message
    assert "1 file changed (new size): img001.png" in message
    assert "restore those files and settings" in message and "delete" in message


# --- defect 4: nothing silently ignored, nothing read from outside ----------------------------------------------------


def test_gif_is_packed_and_an_animated_one_is_noted(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    noise_image(64, 64).convert("P").save(folder / "still.gif")
    frames = [noise_image(64, 64, seed=s).convert("P") for s in range(3)]
    frames[0].save(folder / "moving.gif", save_all=True, append_images=frames[1:])
    result = pack_dataset(_config(tmp_path))
    assert result.samples == 2 and result.skipped == 0
    assert _notes(result)["moving.gif"]["kind"] == "animated" and "3 frames" in _notes(result)["moving.gif"]["note"]


def test_folders_named_like_images_are_reported_not_searched(tmp_path):
    make_dataset(tmp_path / "in", 1)
    (tmp_path / "in" / "x.jpg").mkdir()
    save_image(tmp_path / "in" / "x.png" / "inner.png", noise_image(64, 64))
    result = pack_dataset(_config(tmp_path))
    assert result.samples == 1
    skips = _skips(result)
    assert skips["x.jpg/"]["kind"] == skips["x.png/"]["kind"] == "folder_named_like_image"
    assert "rename it" in skips["x.png/"]["reason"]


def test_unsupported_formats_other_files_and_hidden_entries_are_reported(tmp_path):
    make_dataset(tmp_path / "in", 1)
    (tmp_path / "in" / "phone.HEIC").write_bytes(b"\0" * 10)
    (tmp_path / "in" / "notes.md").write_text("hello")
    (tmp_path / "in" / ".DS_Store").write_bytes(b"\0")
    result = pack_dataset(_config(tmp_path))
    assert _skips(result)["phone.HEIC"]["kind"] == "unsupported_format"
    notes = _notes(result)
    assert notes["notes.md"]["kind"] == "ignored_file" and notes[".DS_Store"]["kind"] == "hidden"
    assert "img000.txt" not in notes  # captions are used, not ignored


def test_link_to_an_image_outside_the_folder_is_refused_unless_allowed(tmp_path):
    make_dataset(tmp_path / "in", 1)
    os.symlink(_outside_image(tmp_path), tmp_path / "in" / "linked.png")
    result = pack_dataset(_config(tmp_path))
    assert result.samples == 1
    skip = _skips(result)["linked.png"]
    assert skip["kind"] == "link_outside" and "copy the file into the folder" in skip["reason"]
    allowed = pack_dataset(_config(tmp_path, "allowed", follow_external_links=True))
    assert allowed.samples == 2 and "linked.png" in _captions(allowed)


def test_link_to_a_folder_outside_is_refused_unless_allowed_and_loops_end(tmp_path):
    make_dataset(tmp_path / "in", 1)
    _outside_image(tmp_path)
    os.symlink(tmp_path / "elsewhere", tmp_path / "in" / "more")
    os.symlink(tmp_path / "in", tmp_path / "in" / "self")  # a loop inside the folder
    os.symlink(tmp_path / "elsewhere", tmp_path / "elsewhere" / "again")  # a loop outside
    result = pack_dataset(_config(tmp_path))
    assert result.samples == 1 and _skips(result)["more"]["kind"] == "link_outside"
    assert _notes(result)["self"]["kind"] == "linked_folder"
    allowed = pack_dataset(_config(tmp_path, "allowed", follow_external_links=True))
    assert _captions(allowed)["more/secret.png"] == "a caption from outside"
    assert allowed.samples == 2


def test_link_inside_the_folder_is_followed(tmp_path):
    make_dataset(tmp_path / "in", 1)
    os.symlink(tmp_path / "in" / "img000.png", tmp_path / "in" / "alias.png")
    result = pack_dataset(_config(tmp_path))
    assert result.samples == 2 and result.skipped == 0


def test_caption_link_outside_the_folder_is_not_read(tmp_path):
    image = save_image(tmp_path / "in" / "a.png", noise_image(64, 64))
    make_dataset(tmp_path / "in", 1)
    (tmp_path / "secret.txt").write_text("the contents of a private file")
    os.symlink(tmp_path / "secret.txt", image.with_suffix(".txt"))
    result = pack_dataset(_config(tmp_path))
    assert "a.png" not in _captions(result)
    assert "private" not in json.dumps(_report(result)) and _skips(result)["a.png"]["kind"] == "caption_unreadable"
    allowed = pack_dataset(_config(tmp_path, "allowed", follow_external_links=True))
    assert _captions(allowed)["a.png"] == "the contents of a private file"


def test_metadata_file_linked_from_outside_is_refused(tmp_path):
    make_dataset(tmp_path / "in", 1)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "img000.png", "text": "x"}\n')
    os.symlink(tmp_path / "metadata.jsonl", tmp_path / "in" / "metadata.jsonl")
    with pytest.raises(ValueError, match="metadata.jsonl: is a symbolic link to .* not followed"):
        pack_dataset(_config(tmp_path))


def test_image_replaced_by_an_outside_link_after_listing_is_not_read(tmp_path):
    make_dataset(tmp_path / "in", 9)
    victim = tmp_path / "in" / "img008.png"
    outside = _outside_image(tmp_path)

    def swap_after_listing(done, total):
        if done == 0:
            victim.unlink()
            os.symlink(outside, victim)

    result = pack_dataset(_config(tmp_path, num_threads=1), progress=swap_after_listing)
    assert result.samples == 8 and _skips(result)["img008.png"]["kind"] == "link_outside"


def test_scan_skips_are_kept_through_an_interrupted_and_resumed_pack(tmp_path):
    make_dataset(tmp_path / "in", 6)
    os.symlink(tmp_path / "gone.png", tmp_path / "in" / "dangling.png")
    with pytest.raises(PackInterrupted):
        pack_dataset(
            _config(tmp_path, samples_per_shard=2),
            should_stop=lambda: len(list((tmp_path / "out").glob("*.tar"))) >= 1,
        )
    resumed = pack_dataset(_config(tmp_path, samples_per_shard=2))
    assert resumed.reused_shards == 1 and resumed.samples == 6
    assert set(_skips(resumed)) == {"dangling.png"}
    reference = pack_dataset(_config(tmp_path, "reference", samples_per_shard=2))
    assert _report(reference) == _report(resumed)


# --- issue 15 item 2: the summary says what was skipped, why, and how to keep it --------------------------------------


def _run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_summary_says_what_was_skipped_why_and_how_to_keep_it(tmp_path, capsys):
    make_dataset(tmp_path / "in", 3)
    for index in range(2):
        save_image(tmp_path / "in" / f"small{index}.png", noise_image(40, 40, seed=index))
    save_image(tmp_path / "in" / "bare.png", noise_image(64, 64))
    os.symlink(_outside_image(tmp_path), tmp_path / "in" / "linked.png")
    assert _run_cli("pack", str(tmp_path / "in"), str(tmp_path / "out"), "--resolution", "64") == 0
    out = capsys.readouterr().out
    assert "packed 4 samples" in out and "skipped 3 of 7 inputs:" in out
    assert "2 too small for their bucket: keep them with --too-small upscale or pack at a lower resolution" in out
    assert "1 symbolic links that leave the folder: keep them with --follow-external-links" in out
    assert "note: 1 packed with an empty caption" in out
    assert f"with its reason: {tmp_path / 'out' / 'report.json'}" in out
    argv = ("pack", str(tmp_path / "in"), str(tmp_path / "kept"), "--resolution", "64", "--too-small", "upscale")
    assert _run_cli(*argv, "--follow-external-links") == 0
    assert "packed 7 samples" in capsys.readouterr().out


def test_cli_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        _run_cli("pack", "--help")
    help_text = capsys.readouterr().out
    assert "(default: skip)" in help_text and "(default: 1024)" in help_text and "--follow-external-links" in help_text


def test_non_utf8_folder_and_link_target_names_are_reported_readably(tmp_path):
    make_dataset(tmp_path / "in", 1)
    os.mkdir(os.fsencode(tmp_path / "in") + b"/f\xf6lder")
    outside = os.fsencode(tmp_path) + b"/\xff.png"
    with open(outside, "wb") as file:
        file.write((tmp_path / "in" / "img000.png").read_bytes())
    os.symlink(outside, os.fsencode(tmp_path / "in") + b"/link.png")
    result = pack_dataset(_config(tmp_path))
    skips = _skips(result)
    assert skips["f\\xf6lder"]["kind"] == "bad_name"
    assert skips["link.png"]["kind"] == "link_outside" and "\\xff.png" in skips["link.png"]["reason"]


def test_all_skipped_error_says_why_and_how_to_keep_them(tmp_path):
    for index in range(3):
        save_image(tmp_path / "in" / f"small{index}.png", noise_image(40, 40, seed=index))
    with pytest.raises(PackError, match="3 too small for their bucket: keep them with too_small='upscale'"):
        pack_dataset(_config(tmp_path))


def test_inputs_record_round_trips_and_a_missing_or_foreign_one_is_said(tmp_path):
    make_dataset(tmp_path / "in", 3)
    result = pack_dataset(_config(tmp_path))
    record = json.loads((result.output_dir / "inputs.json").read_text(encoding="utf-8"))
    manifest = json.loads(result.manifest_path.read_text(encoding="utf-8"))
    assert record["fingerprint"] == manifest["fingerprint"] and record["settings"] == manifest["settings"]
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "in").glob("*.png")}
    assert record["inputs"] == [[name, size] for name, size in sorted(sizes.items())]
    (tmp_path / "in" / "img002.png").unlink()
    record["fingerprint"] = "0" * 64
    (result.output_dir / "inputs.json").write_text(json.dumps(record))
    with pytest.raises(PackError, match="describes another pack"):
        pack_dataset(_config(tmp_path))
    (result.output_dir / "inputs.json").unlink()
    with pytest.raises(PackError, match="no inputs.json saying what it was made from"):
        pack_dataset(_config(tmp_path))
