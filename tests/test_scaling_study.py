"""scripts/scaling_study.py --quick (tiny sizes): it runs, writes its CSVs and finite exponents."""

import csv
import math
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_study_runs(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "scaling_study.py"), "--quick",
           "--parts=time,threshold", "--ns=2,4", "--backends=exact,poly", "--depth=1",
           "--threshold_ns=4", "--rows=8", "--max_degree=8", "--repeats=1",
           f"--out={tmp_path}", f"--compilation_cache={tmp_path / 'jit_cache'}"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "scaling_time.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(int(r["n"]), r["backend"]) for r in rows} == {
        (n, b) for n in (2, 4) for b in ("exact", "poly")}
    assert all(float(r["total_s"]) > 0 and float(r["attention_s"]) > 0 for r in rows)
    for backend in ("exact", "poly"):
        line = re.search(rf"^\s+{backend}\s+total (\S+), attention (\S+),", result.stdout,
                         re.M)
        assert line, result.stdout[-2000:]
        assert all(math.isfinite(float(x)) for x in line.groups())
    with open(tmp_path / "scaling_threshold.csv") as f:
        thr = list(csv.DictReader(f))
    assert {r["kind"] for r in thr} == {"random", "adversarial"}
    assert all(float(r["poly2_err"]) >= 0 for r in thr)
    assert (tmp_path / "scaling_time.png").exists()
    assert (tmp_path / "scaling_threshold.png").exists()
