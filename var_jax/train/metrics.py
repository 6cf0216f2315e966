"""Metric outputs: TensorBoard event files (tensorboardX), a JSONL file and a progress line.

Metrics of step s are fetched from the device only after step s+1 has been dispatched
(`LateFetcher`), so the host never waits for the device just to log.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import numpy as np
from absl import logging


def echo(msg: str) -> None:
    """Prints `msg` once on the terminal and keeps it in the absl log: logged only when absl
    writes to a file (scripts/demo.py sends it to <workdir>/logs), so that a terminal that
    also shows absl's stderr stream never sees the line twice."""
    print(msg, flush=True)
    stream = getattr(logging.get_absl_handler().python_handler, "stream", None)
    if stream not in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__):
        logging.info(msg)


def _scalar(v):
    v = np.asarray(v)
    return float(v) if v.size == 1 else v.tolist()


class MetricWriter:
    """Writes scalars to `<dir>/tb` (TensorBoard) and `<dir>/metrics.jsonl`, images to both TB
    and PNG files."""

    def __init__(self, directory: str, *, enabled: bool = True):
        self.directory = directory
        self.enabled = enabled and jax.process_index() == 0
        self._tb = None
        if self.enabled:
            os.makedirs(directory, exist_ok=True)
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(directory, "tb"))
            self._jsonl = open(os.path.join(directory, "metrics.jsonl"), "a")

    def write_scalars(self, step: int, scalars: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "split": prefix}
        for k, v in scalars.items():
            v = _scalar(v)
            row[k] = v
            if isinstance(v, float):
                self._tb.add_scalar(f"{prefix}/{k}", v, step)
            else:  # a per-scale vector: one curve per entry
                for i, x in enumerate(np.ravel(v)):
                    self._tb.add_scalar(f"{prefix}/{k}/{i}", float(x), step)
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()

    def write_image(self, step: int, name: str, image_HxWx3: np.ndarray) -> str | None:
        """Saves a uint8 image as `<dir>/<name>_<step>.png` and to TensorBoard."""
        if not self.enabled:
            return None
        from PIL import Image

        path = os.path.join(self.directory, f"{name}_{step:07d}.png")
        Image.fromarray(image_HxWx3).save(path)
        self._tb.add_image(name, image_HxWx3, step, dataformats="HWC")
        return path

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()


class LateFetcher:
    """Holds the device metrics of the last step and hands back the previous step's values."""

    def __init__(self):
        self._pending = None

    def push(self, step: int, metrics) -> tuple[int, dict] | None:
        prev, self._pending = self._pending, (step, metrics)
        return None if prev is None else (prev[0], jax.device_get(prev[1]))

    def flush(self) -> tuple[int, dict] | None:
        prev, self._pending = self._pending, None
        return None if prev is None else (prev[0], jax.device_get(prev[1]))


class Progress:
    """A progress line: step, loss, steps/s (since the last line) and the ETA."""

    def __init__(self, total_steps: int, name: str):
        self.total, self.name = total_steps, name
        self._t, self._s = time.time(), None

    def line(self, step: int, metrics: dict) -> str:
        now = time.time()
        rate = 0.0
        if self._s is not None and step > self._s:
            rate = (step - self._s) / max(now - self._t, 1e-9)
        self._t, self._s = now, step
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        extra = " ".join(f"{k}={_scalar(v):.4g}" for k, v in metrics.items()
                         if k != "loss" and np.asarray(v).size == 1)
        eta_text = f"ETA {eta / 60:.1f} min" if rate > 0 else "ETA -"
        msg = (f"[{self.name}] step {step}/{self.total} loss={_scalar(metrics['loss']):.4f} "
               f"{rate:.2f} steps/s {eta_text} {extra}")
        echo(msg)
        return msg
