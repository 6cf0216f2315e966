"""scripts/trained_study.py end to end on a tiny demo workdir (tokenizer trained, classifier
trained by the script): a variant trained at the certified clamp, scored under exact and poly
inference (the Frechet distance against the split's reference), the CSV written."""

import csv
import math
import os
import subprocess
import sys

import _repo

from var_jax.train import runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
tiny_test = _repo.load("configs/tiny_test.py")


def test_trained_study_runs_on_a_tiny_demo_workdir(tmp_path):
    demo_dir = tmp_path / "demo"
    runner.run_stage(tiny_test.get_config(), str(demo_dir), "tokenizer")
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "trained_study.py"),
           f"--config={os.path.join(ROOT, 'configs', 'tiny_test.py')}",
           f"--demo_workdir={demo_dir}", f"--workdir={tmp_path / 'study'}",
           f"--out={tmp_path / 'out'}", "--config.train.evaluate_at_end=False", "--steps=2",
           "--variants=exact-sB", "--inference=exact,poly", "--per_class=2",
           f"--compilation_cache={tmp_path / 'jit_cache'}"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "out" / "trained_models.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["trained"], r["inference"]) for r in rows] == [
        ("exact-sB", "exact"), ("exact-sB", "poly-2")]
    for r in rows:
        assert math.isfinite(float(r["token_nll"])) and float(r["frechet"]) > 0
        assert 0 <= float(r["class_accuracy"]) <= 1
        assert float(r["logit_bound"]) <= 0.25 + 1e-6  # the certified clamp held
    exact, poly = rows
    assert float(exact["greedy_agreement"]) == 1.0 and exact["verdict"] == "exact"
    assert "degree" in poly["verdict"]  # the criterion's verdict at the model's own bound
    assert (demo_dir / "classifier").exists()  # trained once by the script, kept for reruns
