"""Data sources and Grain pipelines: IDX parsing, determinism, sharding, resumable position,
ImageNet-layout folders with a corrupt file and an empty class."""

import gzip
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from var_jax import data
from var_jax.data import digits, fashion_mnist, image_folder


def _write_idx(path, array):
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(array.dtype.newbyteorder(">")).tobytes())


def test_read_idx_round_trip_and_bad_files(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 3, 4), dtype=np.uint8)
    _write_idx(str(tmp_path / "x.gz"), images)
    np.testing.assert_array_equal(fashion_mnist.read_idx(str(tmp_path / "x.gz")), images)
    ints = np.arange(6, dtype=np.int32).reshape(2, 3) - 3
    _write_idx(str(tmp_path / "i.gz"), ints)
    np.testing.assert_array_equal(fashion_mnist.read_idx(str(tmp_path / "i.gz")), ints)
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="declares shape"):
        fashion_mnist.read_idx(str(tmp_path / "short.gz"))
    with gzip.open(tmp_path / "magic.gz", "wb") as f:
        f.write(b"\x1f\x8bxx")
    with pytest.raises(ValueError, match="magic"):
        fashion_mnist.read_idx(str(tmp_path / "magic.gz"))


def test_fashion_mnist_fake_root_and_missing(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 4)):
        _write_idx(str(tmp_path / f"{prefix}-images-idx3-ubyte.gz"),
                   rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(str(tmp_path / f"{prefix}-labels-idx1-ubyte.gz"),
                   rng.integers(0, 10, (n,), dtype=np.uint8))
    assert fashion_mnist.available(str(tmp_path))
    images, labels = fashion_mnist.load("test", str(tmp_path))
    assert images.shape == (4, 28, 28) and labels.dtype == np.int32
    with pytest.raises(ValueError, match="dataset-fashion-mnist"):
        fashion_mnist.load("train", str(tmp_path / "nowhere"))


def test_digits_split_is_disjoint_and_balanced():
    train_x, train_y = digits.load("train")
    test_x, test_y = digits.load("test")
    assert len(train_y) + len(test_y) == 1797
    assert train_x.dtype == np.uint8 and train_x.max() == 255
    assert set(np.unique(test_y)) == set(range(10))
    train_set = {x.tobytes() + bytes([y]) for x, y in zip(train_x, train_y, strict=True)}
    pairs = zip(test_x, test_y, strict=True)
    assert not any(x.tobytes() + bytes([y]) in train_set for x, y in pairs)


def _digits_source(size=8):
    config = ml_collections.ConfigDict(dict(source="digits", root="", image_size=size))
    return data.make_source(config, "train")


def test_pipeline_deterministic_sharded_and_resumable():
    source = _digits_source(12)
    assert source.images.shape[1:] == (12, 12)

    def batches(seed, n, **kw):
        it = iter(data.make_dataset(source, batch_size=4, seed=seed, train=True, image_size=12,
                                    **kw))
        return [next(it) for _ in range(n)]

    a, b, c = batches(0, 3), batches(0, 3), batches(1, 3)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
    assert not np.array_equal(a[0]["label"], c[0]["label"]) or \
        not np.array_equal(a[0]["image"], c[0]["image"])
    assert a[0]["image"].shape == (4, 12, 12, 3) and a[0]["image"].dtype == np.float32
    assert a[0]["image"].min() >= -1 and a[0]["image"].max() <= 1
    # Two shards see disjoint examples.
    n = len(source) // 2
    s0 = np.concatenate([x["image"] for x in batches(0, n // 4, shard_index=0, shard_count=2)])
    s1 = np.concatenate([x["image"] for x in batches(0, n // 4, shard_index=1, shard_count=2)])
    keys0 = {x.tobytes() for x in s0}
    assert len(keys0) > 0.9 * len(s0) and not keys0 & {x.tobytes() for x in s1}
    # The position is a JSON-able state: restoring it replays the same batches.
    it = data.DataIterator(data.make_dataset(source, batch_size=4, seed=0, train=True,
                                             image_size=12), source)
    next(it)
    state = it.get_state()
    expected = [next(it)["label"] for _ in range(2)]
    it2 = data.DataIterator(data.make_dataset(source, batch_size=4, seed=0, train=True,
                                              image_size=12), source)
    it2.set_state(state)
    np.testing.assert_array_equal(next(it2)["label"], expected[0])
    np.testing.assert_array_equal(next(it2)["label"], expected[1])
    with pytest.raises(ValueError, match="batch_size"):
        data.make_dataset(source, batch_size=0, seed=0, train=True, image_size=12)


def test_resize_and_crop_follows_the_official_augmentation():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 80), np.uint8))
    centre = image_folder.resize_and_crop(img, 16, None)
    assert centre.shape == (16, 16, 3)  # grayscale -> RGB
    # Shorter side 40 -> round(1.125 * 16) = 18, so the long side becomes 36.
    resized = np.asarray(img.convert("RGB").resize((36, 18), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(centre, resized[1:17, 10:26])
    crops = {image_folder.resize_and_crop(img, 16, np.random.default_rng(s)).tobytes()
             for s in range(6)}
    assert len(crops) > 1


def test_image_folder_skips_corrupt_file_and_empty_class(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("ant", "bee"):
            os.makedirs(tmp_path / split / cls)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), np.uint8)).save(
                    tmp_path / split / cls / f"{i}.jpg")
        os.makedirs(tmp_path / split / "empty_cat")
    Image.fromarray(rng.integers(0, 256, (30, 20), np.uint8)).save(
        tmp_path / "train" / "bee" / "gray.png")
    with open(tmp_path / "train" / "ant" / "broken.jpg", "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    config = ml_collections.ConfigDict(dict(source="image_folder", root=str(tmp_path),
                                            image_size=16, train_split="train",
                                            eval_split="val"))
    source = data.make_source(config, "train")
    assert source.classes == ["ant", "bee"] and source.empty_classes == ["empty_cat"]
    assert len(source) == 8
    ds = data.make_dataset(source, batch_size=2, seed=0, train=False, image_size=16)
    batches = list(ds)
    labels = np.concatenate([b["label"] for b in batches])
    assert len(labels) == 7 and sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1, 1]
    assert batches[0]["image"].shape == (2, 16, 16, 3)
    report = source.report()
    assert report["bad_files"] == [str(tmp_path / "train" / "ant" / "broken.jpg")]
    assert report["empty_classes"] == ["empty_cat"]
    val = data.make_source(config, "test")
    assert val.classes == ["ant", "bee"] and len(val) == 6
    with pytest.raises(ValueError, match="class folders"):
        image_folder.ImageFolderSource(str(tmp_path), "missing_split")
