"""bench/loss_curves.py's reference from an earlier run (``--reference FILE:VARIANT``): the curve is read back as
written by ``--out``, and a missing variant or another step count is refused naming what the file has."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_a_reference_curve_is_read_from_an_earlier_out_file(tmp_path):
    from loss_curves import compare, load_reference

    curves = {"compiled-peft": [2.0, 1.9, 1.8], "compiled": [2.0, 1.9, 1.7]}
    path = tmp_path / "curves.json"
    path.write_text(json.dumps({"rows": [], "curves": curves}) + "\n")
    reference = load_reference(f"{path}:compiled-peft", 3)
    assert reference == curves["compiled-peft"]
    assert compare(reference, curves["compiled"])["raw_mean_rel"] == pytest.approx((0.1 / 1.8) / 3)
    with pytest.raises(SystemExit, match=r"no 3-step curve 'fp8' \(it has \['compiled', 'compiled-peft'\]\)"):
        load_reference(f"{path}:fp8", 3)
    with pytest.raises(SystemExit, match="no 4-step curve"):
        load_reference(f"{path}:compiled", 4)
