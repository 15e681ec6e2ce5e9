"""Caption files in any encoding a user's editor saves keep their image (issue 13 defect 5)."""

from __future__ import annotations

import codecs
import json

import pytest

from tests.data_fixtures import make_dataset, noise_image, save_image, write_caption
from training.data.captions import decode_text
from training.data.pack import PackConfig, pack_dataset
from training.data.shards import read_samples

TEXT = "Ein Bär im Café — 猫"


@pytest.mark.parametrize(
    ("data", "noted"),
    [
        (codecs.BOM_UTF8 + TEXT.encode("utf-8"), False),
        (codecs.BOM_UTF16_LE + TEXT.encode("utf-16-le"), False),
        (codecs.BOM_UTF16_BE + TEXT.encode("utf-16-be"), False),
        (codecs.BOM_UTF32_LE + TEXT.encode("utf-32-le"), False),
        (codecs.BOM_UTF32_BE + TEXT.encode("utf-32-be"), False),
        (TEXT.encode("utf-8"), False),
        (TEXT.encode("utf-16-le"), True),  # no byte-order mark
    ],
)
def test_byte_order_marks_and_utf16_without_one_decode_exactly(data, noted):
    text, notes = decode_text(data, "caption file a.txt")
    assert text == TEXT
    assert bool(notes) == noted and all("a.txt" in note for note in notes)


def test_latin1_and_windows_1252_fall_back_with_a_note():
    text, notes = decode_text("café “quoted”".encode("cp1252"), "caption file a.txt")
    assert text == "café “quoted”"
    assert len(notes) == 1 and "not UTF-8" in notes[0] and "a.txt" in notes[0]
    text, _ = decode_text(b"caf\xe9 \x81", "x")  # 0x81 is unassigned in Windows-1252: Latin-1 takes it
    assert text == "café \x81"


def test_broken_utf16_is_decoded_with_replacement_and_a_note():
    text, notes = decode_text(codecs.BOM_UTF16_LE + "ab".encode("utf-16-le") + b"\x00\xd8", "caption file a.txt")
    assert text.startswith("ab") and "\ufffd" in text and "U+FFFD" in notes[0]


def _pack(tmp_path, **overrides):
    config = PackConfig(
        input_dir=tmp_path / "in", output_dir=tmp_path / "out", resolution=64, store_image=True, **overrides
    )
    result = pack_dataset(config)
    paths = [result.output_dir / shard.name for shard in result.shards]
    captions = {json.loads(s["json"])["source"]: s["txt"].decode("utf-8") for s in read_samples(paths)}
    return result, captions, json.loads(result.report_path.read_text(encoding="utf-8"))


def test_no_image_is_dropped_for_its_caption_encoding(tmp_path):
    folder = tmp_path / "in"
    encoded = {
        "utf16_bom": codecs.BOM_UTF16_LE + TEXT.encode("utf-16-le"),
        "utf16_be_bom": codecs.BOM_UTF16_BE + TEXT.encode("utf-16-be"),
        "latin1": "Ein Bär im Café".encode("latin-1"),
        "nul_bytes": b"a red\x00 fox\x00",
    }
    for index, (name, data) in enumerate(encoded.items()):
        write_caption(save_image(folder / f"{name}.png", noise_image(64, 64, seed=index)), data)
    result, captions, report = _pack(tmp_path)
    assert result.samples == 4 and report["skipped"] == []
    assert captions == {
        "utf16_bom.png": TEXT,
        "utf16_be_bom.png": TEXT,
        "latin1.png": "Ein Bär im Café",
        "nul_bytes.png": "a red fox",
    }
    notes = {entry["path"]: entry["note"] for entry in report["notes"]}
    assert set(notes) == {"latin1.png", "nul_bytes.png"}
    assert "NUL" in notes["nul_bytes.png"] and "re-save it as UTF-8" in notes["latin1.png"]


def test_utf16_metadata_csv_from_a_spreadsheet_is_read(tmp_path):
    make_dataset(tmp_path / "in", 2)
    rows = "file_name,text\r\nimg000.png,Bär\r\nimg001.png,\x00zwei\r\n"
    (tmp_path / "in" / "metadata.csv").write_bytes(codecs.BOM_UTF16_LE + rows.encode("utf-16-le"))
    result, captions, report = _pack(tmp_path)
    assert captions == {"img000.png": "Bär", "img001.png": "zwei"}
    assert any(entry["path"] == "metadata.csv" and "NUL" in entry["note"] for entry in report["notes"])


def test_latin1_metadata_jsonl_is_read_with_a_note(tmp_path):
    make_dataset(tmp_path / "in", 1)
    (tmp_path / "in" / "metadata.jsonl").write_bytes('{"file_name": "img000.png", "text": "Café"}\n'.encode("latin-1"))
    _, captions, report = _pack(tmp_path)
    assert captions == {"img000.png": "Café"}
    assert any(entry["path"] == "metadata.jsonl" and "not UTF-8" in entry["note"] for entry in report["notes"])
