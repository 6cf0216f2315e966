"""Grain input pipelines: one function turns a data config into a deterministic batch iterator.

Determinism: the order is a function of (seed, shard) only (Grain's index shuffle reshuffles every
epoch from the seed), random crops draw from per-index generators, so the same seed gives the same
batches. Each process reads its own slice `index::count` of the index space. The iterator state is
a small JSON dict (`get_state` / `set_state`) stored with every checkpoint, so a resumed run sees
exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np
from PIL import Image

from var_jax.data import digits, fashion_mnist, image_folder

SOURCES = ("fashion_mnist", "digits", "image_folder")


@dataclasses.dataclass
class ArraySource:
    """In-memory grayscale images (N, S, S) uint8 already at the model's image size."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        # The index lets a recipe look up per-example caches (e.g. precomputed VAR tokens).
        return {"image": self.images[index], "label": self.labels[index],
                "index": np.int32(index)}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def report(self) -> dict:
        return {"num_files": len(self), "num_classes": self.num_classes,
                "empty_classes": [], "bad_files": []}


def fit_to_size(images_NxHxW: np.ndarray, size: int) -> np.ndarray:
    """Zero-pads (centred) when the images are smaller by an even margin, else Lanczos-resizes.

    Padding keeps Fashion-MNIST's 28x28 pixels exact inside a 32x32 frame (its background is
    already 0); other sizes go through Pillow.
    """
    n, h, w = images_NxHxW.shape
    if (h, w) == (size, size):
        return images_NxHxW
    if h == w and size > h and (size - h) % 2 == 0:
        m = (size - h) // 2
        return np.pad(images_NxHxW, ((0, 0), (m, m), (m, m)))
    out = np.empty((n, size, size), np.uint8)
    for i in range(n):
        img = Image.fromarray(images_NxHxW[i]).resize((size, size), Image.Resampling.LANCZOS)
        out[i] = np.asarray(img)
    return out


def make_source(data_config, split: str):
    """Builds the random-access source named by `data_config.source` for split train/test."""
    source = data_config.source
    if source == "fashion_mnist":
        images, labels = fashion_mnist.load(split, data_config.root or fashion_mnist.DEFAULT_ROOT)
        return ArraySource(fit_to_size(images, data_config.image_size), labels,
                           fashion_mnist.CLASS_NAMES)
    if source == "digits":
        images, labels = digits.load(split)
        return ArraySource(fit_to_size(images, data_config.image_size), labels,
                           digits.CLASS_NAMES)
    if source == "image_folder":
        if not data_config.root:
            raise ValueError("data.root: expected the image folder root for "
                             "source='image_folder', found an empty value")
        folder_split = data_config.train_split if split == "train" else data_config.eval_split
        classes = None
        if split != "train":
            classes = image_folder.ImageFolderSource(
                data_config.root, data_config.train_split).classes
        return image_folder.ImageFolderSource(data_config.root, folder_split, classes)
    raise ValueError(f"data.source: expected one of {SOURCES}, found {source!r}")


def normalize(batch: dict) -> dict:
    """uint8 images (B, H, W[, C]) -> float32 RGB in [-1, 1]; labels (and indices) int32."""
    images = np.asarray(batch["image"], np.float32)
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    out = {"image": images * (2.0 / 255.0) - 1.0, "label": np.asarray(batch["label"], np.int32)}
    if "index" in batch:
        out["index"] = np.asarray(batch["index"], np.int32)
    return out


def make_dataset(source, *, batch_size: int, seed: int, train: bool, image_size: int,
                 shard_index: int = 0, shard_count: int = 1, num_threads: int = 0,
                 num_epochs: int | None = None,
                 global_order: bool = False) -> grain.IterDataset:
    """The Grain pipeline for one process: shard -> shuffle/repeat -> decode -> batch -> scale.

    Training pipelines repeat forever and drop the last partial batch; evaluation pipelines run
    `num_epochs` (default 1) epochs in order and keep the last partial batch. With
    `global_order` (training), all processes shuffle the whole source the same way and process
    i takes the i-th contiguous slice of every global batch of batch_size * shard_count
    examples, so the global batches (and a run's results) do not depend on the process count;
    each process still reads and decodes only its own examples.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, found {batch_size}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index: expected 0 <= index < {shard_count}, found {shard_index}")
    global_order = global_order and train and shard_count > 1
    ds = grain.MapDataset.source(source)
    if not global_order:
        ds = ds[shard_index::shard_count]
    if len(ds) == 0:
        raise ValueError(f"data: shard {shard_index}/{shard_count} of a source of "
                         f"{len(source)} examples is empty")
    if train:
        ds = ds.shuffle(seed=seed).repeat(num_epochs)
    elif num_epochs not in (None, 1):
        ds = ds.repeat(num_epochs)
    if isinstance(source, image_folder.ImageFolderSource):
        if train:
            ds = ds.random_map(lambda rec, rng: source.load(rec, image_size, rng), seed=seed)
        else:
            ds = ds.map(lambda rec: source.load(rec, image_size, None))
    if global_order:
        ds = _process_slice(ds, batch_size, shard_index, shard_count)
    # None (an unreadable file) is dropped by the conversion to an IterDataset.
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(num_threads, 1))
    it_ds = ds.to_iter_dataset(read)
    return it_ds.batch(batch_size, drop_remainder=train).map(normalize)


def _process_slice(ds: grain.MapDataset, batch_size: int, index: int,
                   count: int) -> grain.MapDataset:
    """Local example i -> global example (i // b) * b * n + index * b + i % b (b local batch,
    n processes): this process's contiguous part of each global batch, read lazily."""
    span = batch_size * count

    def pick(i):
        return ds[(i // batch_size) * span + index * batch_size + i % batch_size]

    return grain.MapDataset.range(len(ds) // count).map(pick)


class DataIterator:
    """A batch iterator with a JSON-serialisable position (for exact resume)."""

    def __init__(self, dataset: grain.IterDataset, source: Any):
        self.source = source
        self._it = iter(dataset)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._it)

    def get_state(self) -> dict:
        return self._it.get_state()

    def set_state(self, state: dict) -> None:
        self._it.set_state(state)

    def report(self) -> dict:
        return self.source.report()
