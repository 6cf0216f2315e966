"""The demo driver end to end on the tiny config: report, summary table and the four pictures
(as PNGs of the right size and as TensorBoard images)."""

import json
import os

import _repo
import numpy as np
from PIL import Image

from var_jax import data
from var_jax.evaluate import figures
from var_jax.train import demo

tiny_test = _repo.load("configs/tiny_test.py")


def _figure_size(grid_h: int, grid_w: int, row_labels: bool, col_labels: bool, title: bool):
    """(width, height) in pixels of figures._figure for a tiled grid of grid_h x grid_w."""
    fig = figures._figure(np.zeros((grid_h, grid_w, 3), np.uint8),
                          row_labels=["r"] if row_labels else (),
                          col_labels=["c"] if col_labels else (), title="t" if title else "")
    w, h = fig.get_size_inches() * fig.dpi
    return round(w), round(h)


def test_tiny_demo_writes_report_table_and_pictures(tmp_path):
    config = tiny_test.get_config()
    config.sample.cfg_sweep = (0.0, 1.5)
    config.var.model.remat = "dots_saveable"  # the demo config's layer policy
    report = demo.run_demo(config, str(tmp_path))
    saved = json.load(open(tmp_path / "demo_report.json"))
    assert set(saved["samples"]["by_cfg"]) == {"0.0", "1.5"}
    assert 0 <= saved["samples"]["by_cfg"]["1.5"]["class_accuracy"] <= 1
    assert all(entry["class_spread"] > 0 for entry in saved["samples"]["by_cfg"].values())
    # Two rulers: the whole test split less held-out real images (the floor), and the first
    # test images the bar was set on.
    for entry in saved["samples"]["by_cfg"].values():
        assert entry["frechet_classifier"] > 0 and entry["frechet_first_test_images"] > 0
    assert saved["samples"]["frechet_real_vs_real"] > 0
    assert saved["samples"]["frechet_real_vs_real_first_test_images"] > 0
    split = len(data.make_source(config.data, "test").labels)
    assert saved["samples"]["reference_images"] == split - 10 * config.sample.eval_per_class
    table = demo.summary_table(report)
    assert "tokenizer_psnr" in table and "class_accuracy_cfg0" in table
    assert "class spread" in table and "whole-split ruler" in table
    assert "frechet_default_cfg_first_test_images" in table
    assert len(table.splitlines()) < 30  # a table, not the JSON dump

    # Tiles of 8x8 images with 2-pixel gaps: 10 classes; 3 scales; 2 cfgs x 2 seeds; 10 + 10.
    def tiles(rows, cols):
        return rows * 10 + 2, cols * 10 + 2

    expected = {
        "class_grid": _figure_size(*tiles(10, config.sample.per_class), True, False, True),
        "coarse_to_fine": _figure_size(*tiles(10, 3), True, True, True),
        "guidance_sweep": _figure_size(*tiles(10, 2 * 2), True, True, True),
        "reconstructions": _figure_size(*tiles(2, 10), True, False, True),
    }
    for name, size in expected.items():
        path = report["outputs"][name]
        assert os.path.dirname(path) == str(tmp_path)
        with Image.open(path) as image:
            assert image.size == size, name
    assert _tensorboard_image_tags(tmp_path / "tb") == {f"demo/{name}" for name in expected}


def _tensorboard_image_tags(directory) -> set[str]:
    """Image tags in the event files of `directory` (TFRecord framing: u64 length, u32 CRC,
    the Event proto, u32 CRC)."""
    import struct

    from tensorboardX.proto import event_pb2

    tags = set()
    for path in directory.glob("events.out.tfevents.*"):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            tags |= {v.tag for v in event.summary.value if v.HasField("image")}
            pos += 12 + length + 4
    return tags


def test_coarse_to_fine_last_column_is_the_decoded_sample():
    import jax
    from flax import nnx

    from var_jax.models.vqvae import VQVAE, VQVAEConfig

    vqvae = VQVAE(VQVAEConfig.tiny(), rngs=nnx.Rngs(0))
    maps = [jax.random.randint(jax.random.key(k), (2, p, p), 0, vqvae.config.vocab_size)
            for k, p in enumerate(vqvae.config.patch_nums)]
    steps = figures.coarse_to_fine_images(vqvae, maps)
    assert steps.shape == (2, len(maps), 32, 32, 3)
    full = np.asarray(vqvae.indices_to_images(maps)) * 0.5 + 0.5
    np.testing.assert_allclose(steps[:, -1], full, atol=1e-5)
    # Earlier columns are decoded from partial sums, so they differ from the final image.
    assert np.abs(steps[:, 0] - steps[:, -1]).max() > 1e-3


def test_phase_clock_eta_ignores_phases_restored_from_a_checkpoint(monkeypatch, capsys):
    """A resumed run restores a finished stage in ~0 s: the ETA must not read that as a machine
    infinitely fast, but scale the reference times by the phases that really ran."""
    now = [0.0]
    monkeypatch.setattr(demo.time, "time", lambda: now[0])
    clock = demo.PhaseClock((("a", 100.0), ("b", 100.0), ("c", 100.0)))
    clock.start(0)
    now[0] += 0.5  # restored
    clock.end()
    clock.start(1)
    assert "about 3.3 min left" in capsys.readouterr().out  # 200 s of reference, speed 1
    now[0] += 200.0  # this machine runs at half the reference speed
    clock.end()
    clock.start(2)
    assert "about 3.3 min left" in capsys.readouterr().out  # 100 s of reference x 2


def test_sigterm_in_a_stage_ends_the_demo_without_evaluating(tmp_path, monkeypatch):
    """A stage that returns preempted (SIGTERM: saved, status 0) ends the demo there: no later
    stage, no evaluation of a half-trained model, no report; the rerun resumes."""
    calls = []

    def fake_stage(config, workdir, stage):
        calls.append(stage)
        return {"stage": stage, "step": 7, "dir": str(tmp_path / stage), "preempted": True}

    monkeypatch.setattr(demo.runner, "run_stage", fake_stage)
    out = demo.run_demo(tiny_test.get_config(), str(tmp_path))
    assert out == {"stopped": {"stage": "tokenizer", "step": 7,
                               "dir": str(tmp_path / "tokenizer")}}
    assert calls == ["tokenizer"]
    assert not (tmp_path / "demo_report.json").exists()
