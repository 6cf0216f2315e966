"""Image folders in the ImageNet layout (`root/{train,val}/<class>/<image>`), decoded with Pillow.

Augmentation follows the official VAR recipe: the shorter side is resized to round(1.125 R) with
Lanczos, then a random R x R crop for training or the centre crop for evaluation; no flips.
Grayscale (and palette / CMYK) images become RGB. A file that cannot be decoded is skipped,
counted and reported (a warning and `bad_files`), never fatal: one corrupt JPEG among a million
must not stop a week-long run. Empty class folders are reported and left out of the classes.
"""

from __future__ import annotations

import os
import threading

import numpy as np
from absl import logging
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff", ".gif")


def scan_classes(split_dir: str) -> tuple[list[str], list[str]]:
    """Returns (non-empty class folder names sorted, empty class folder names)."""
    if not os.path.isdir(split_dir):
        raise ValueError(f"image folder: expected a directory of class folders at "
                         f"{split_dir!r}, found nothing there")
    classes, empty = [], []
    for name in sorted(os.listdir(split_dir)):
        path = os.path.join(split_dir, name)
        if not os.path.isdir(path):
            continue
        has_image = any(f.lower().endswith(IMAGE_EXTENSIONS) for f in os.listdir(path))
        (classes if has_image else empty).append(name)
    return classes, empty


def resize_and_crop(img: Image.Image, size: int, rng: np.random.Generator | None) -> np.ndarray:
    """Shorter side to round(1.125 size) (Lanczos), then a random (rng given) or centre crop."""
    img = img.convert("RGB")
    w, h = img.size
    short = round(1.125 * size)
    scale = short / min(w, h)
    new_w, new_h = max(short, round(w * scale)), max(short, round(h * scale))
    img = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
    if rng is None:
        left, top = (new_w - size) // 2, (new_h - size) // 2
    else:
        left = int(rng.integers(0, new_w - size + 1))
        top = int(rng.integers(0, new_h - size + 1))
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


class ImageFolderSource:
    """Random-access source of (path, label) records; `load` decodes and augments one record.

    Args:
      root: the dataset root holding `split` (e.g. "train" or "val") class folders.
      split: the sub-folder to read.
      classes: the class folder names that define labels 0..N-1. Pass the train split's classes
        when reading val so that labels agree even if a val class folder is empty.
    """

    def __init__(self, root: str, split: str, classes: list[str] | None = None):
        split_dir = os.path.join(root, split)
        found, self.empty_classes = scan_classes(split_dir)
        self.classes = list(found if classes is None else classes)
        if not self.classes:
            raise ValueError(f"image folder {split_dir!r}: expected class folders with images, "
                             f"found none (empty class folders: {self.empty_classes})")
        for name in self.empty_classes:
            logging.warning("image folder %s: class folder %r has no images; skipped",
                            split_dir, name)
        records = []
        for label, name in enumerate(self.classes):
            folder = os.path.join(split_dir, name)
            if not os.path.isdir(folder):
                continue
            for f in sorted(os.listdir(folder)):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    records.append((os.path.join(folder, f), label))
        self.records = records
        self.bad_files: list[str] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[str, int]:
        return self.records[index]

    def load(self, record: tuple[str, int], size: int,
             rng: np.random.Generator | None) -> dict | None:
        """Decoded example {"image": uint8 (size, size, 3), "label": int32}, or None if corrupt."""
        path, label = record
        try:
            with Image.open(path) as img:
                img.load()
                image = resize_and_crop(img, size, rng)
        except Exception as e:
            with self._lock:
                if path not in self.bad_files:
                    self.bad_files.append(path)
                    logging.warning("skipping unreadable image %s (%s: %s); %d skipped so far",
                                    path, type(e).__name__, e, len(self.bad_files))
            return None
        return {"image": image, "label": np.int32(label)}

    def report(self) -> dict:
        return {"num_files": len(self.records), "num_classes": len(self.classes),
                "empty_classes": list(self.empty_classes), "bad_files": list(self.bad_files)}
