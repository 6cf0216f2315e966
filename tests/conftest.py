import os
import pathlib

import numpy as np
import pytest

# Tests run on the CPU in float32 with deterministic reductions; keep XLA to the cores we have.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The official PyTorch VAR's outputs for int8-exact weights, stored in the repository
# (tests/testdata/official_var_int8/README.md says what they are and how they were made).
OFFICIAL_INT8 = pathlib.Path(__file__).resolve().parent / "testdata" / "official_var_int8"


def unpack_int8_state_dict(path) -> dict[str, np.ndarray]:
    """A state dict from `q:K` (int8) and `e:K` (int32 exponent) pairs: w = q * 2^e in float32,
    exact; a `q:K` without `e:K` (integer buffers, the -inf mask) is the tensor as stored."""
    with np.load(path, allow_pickle=False) as packed:
        files = set(packed.files)
        out = {}
        for name in files:
            if not name.startswith("q:"):
                continue
            key, q = name[2:], packed[name]
            if f"e:{key}" in files:
                e = int(packed[f"e:{key}"])
                out[key] = (q.astype(np.float32) * np.float32(2.0 ** e)).astype(np.float32)
            else:
                out[key] = np.asarray(q)
    return out


class OfficialVectors:
    """The unpacked test vectors: `vae_sd`, `var_sd` (float32 state dicts), `vectors` (with
    `image_NHWC` in [-1, 1] rebuilt from the stored uint8 exactly as the official run did), and
    state-dict files written on demand into a session temporary directory."""

    def __init__(self, tmp_dir: pathlib.Path):
        self.vae_sd = unpack_int8_state_dict(OFFICIAL_INT8 / "vae_int8.npz")
        self.var_sd = unpack_int8_state_dict(OFFICIAL_INT8 / "var_int8.npz")
        with np.load(OFFICIAL_INT8 / "vectors.npz", allow_pickle=False) as v:
            self.vectors = {k: np.asarray(v[k]) for k in v.files}
        u = self.vectors["image_NHWC_uint8"].astype(np.float32)
        self.vectors["image_NHWC"] = u / np.float32(255) * np.float32(2) - np.float32(1)
        self.patch_nums = tuple(int(p) for p in self.vectors["patch_nums"])
        self.index_maps = [self.vectors[f"indices_scale{k}"] for k in range(len(self.patch_nums))]
        self._dir = tmp_dir
        self._files: dict[str, pathlib.Path] = {}

    def npz(self, which: str) -> pathlib.Path:
        """`which` ("vae" or "var") as an .npz state dict file."""
        path = self._dir / f"{which}_state_dict.npz"
        if which not in self._files:
            np.savez(path, **getattr(self, f"{which}_sd"))
            self._files[which] = path
        return path

    def pth(self, which: str) -> pathlib.Path:
        """`which` as a torch .pth file (torch.save of a dict of tensors); needs torch."""
        torch = pytest.importorskip("torch")
        path = self._dir / f"{which}.pth"
        if f"{which}.pth" not in self._files:
            sd = {k: torch.from_numpy(np.ascontiguousarray(v))
                  for k, v in getattr(self, f"{which}_sd").items()}
            torch.save(sd, path)
            self._files[f"{which}.pth"] = path
        return path


@pytest.fixture(scope="session")
def official_int8(tmp_path_factory):
    """The official outputs of a depth-2 VAR (width 128, 256px schedule) and a ch=32 VQ-VAE."""
    return OfficialVectors(tmp_path_factory.mktemp("official_var_int8"))


# `make test` hands whole files to two workers (--dist loadfile --no-loadscope-reorder) in the
# order collected. These files' tests take minutes on a 2-core machine; collected in name order
# the longest (the scale-out runs, 7-9 minutes) started last and ran alone at the end while
# the other worker idled. Run first, the two workers finish together.
SLOW_FILES_FIRST = ("test_train_scale.py", "test_train.py", "test_scan_layers.py",
                    "test_trained_study.py", "test_demo.py", "test_sampling.py",
                    "test_scaling_study.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES_FIRST)))
