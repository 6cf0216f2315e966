"""scripts/tokenizer_roundtrip.py runs end to end on a real photograph (random tiny weights)."""

import pathlib
import re
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "tokenizer_roundtrip.py"


def test_roundtrip_script_reports_error_and_code_usage(tmp_path):
    pytest.importorskip("skimage")
    out_png = tmp_path / "roundtrip.png"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--images=astronaut", f"--output={out_png}"],
        capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "RANDOM weights" in out
    assert "patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16)" in out
    # One usage row per scale of the 256px schedule, tokens = pn**2 for the one image.
    rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)%", out, flags=re.M)
    assert [(int(pn), int(tokens)) for _, pn, tokens, *_ in rows] == [
        (pn, pn * pn) for pn in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)]
    assert all(1 <= int(distinct) <= int(tokens) for _, _, tokens, distinct, _ in rows)
    mse = float(re.search(r"^astronaut\s+([\d.]+)", out, flags=re.M).group(1))
    assert 0.0 < mse < 4.0
    assert out_png.stat().st_size > 0
