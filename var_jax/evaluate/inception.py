"""The Inception-v3 network that FID is defined with, in Flax NNX (NHWC), for weights in
pytorch-fid's state-dict layout (``pt_inception-2015-12-05-*.pth``, or an .npz of the same keys).

FID numbers are only comparable between papers when they come from this exact network: the 2015
TensorFlow Inception graph, which differs from torchvision's Inception-v3 in its weights and in
three details that change the features: average pools inside the mixed blocks ignore the padded
zeros (TF semantics), the last block's pool branch uses max pooling, and batch norm uses eps 1e-3.
Inputs in [0, 1] are resized to 299x299 bilinearly (torch ``interpolate`` with
``align_corners=False``, no antialiasing, as pytorch-fid does) and mapped to [-1, 1]; the output
is the 2048-d global average pool ("pool3") feature.

Batch norm runs in inference mode only (running statistics), so its four tensors are stored as
plain parameters under the torch names and loading reuses the strict rules of
:mod:`var_jax.convert.common` unchanged.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax import interp
from var_jax.convert import common

FID_IMAGE_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3
# In pytorch-fid's file but not needed for pool3 features (the 1008-way classifier and BN step
# counters); ignored explicitly so that every other unknown key is still an error.
IGNORED_KEYS = ("fc.weight", "fc.bias")
IGNORED_SUFFIX = "num_batches_tracked"


# ----------------------------------------------------------------------------------------------
# Pure functions.

def resize_bilinear(images_BxHxWxC: jax.Array, size: int) -> jax.Array:
    """Bilinear resize to (size, size), equal to torch ``F.interpolate(mode="bilinear",
    align_corners=False)``."""
    return interp.resize(images_BxHxWxC, (size, size), "bilinear")


def preprocess(images_BxHxWx3: jax.Array, size: int = FID_IMAGE_SIZE) -> jax.Array:
    """Images in [0, 1] -> (B, size, size, 3) in [-1, 1], the network's input."""
    return 2.0 * resize_bilinear(images_BxHxWx3, size) - 1.0


def _pool_window(x, init, op, stride, padding):
    return jax.lax.reduce_window(x, init, op, (1, 3, 3, 1), (1, stride, stride, 1),
                                 ((0, 0), (padding, padding), (padding, padding), (0, 0)))


def avg_pool_3x3_exclude_pad(x_BxHxWxC: jax.Array) -> jax.Array:
    """3x3 stride-1 average pool with padding 1 that averages only the real pixels
    (torch ``count_include_pad=False``, TF's SAME average pool)."""
    total = _pool_window(x_BxHxWxC, 0.0, jax.lax.add, 1, 1)
    ones = jnp.ones((1,) + x_BxHxWxC.shape[1:3] + (1,), x_BxHxWxC.dtype)
    count = _pool_window(ones, 0.0, jax.lax.add, 1, 1)
    return total / count


def max_pool_3x3(x_BxHxWxC: jax.Array, stride: int = 1, padding: int = 0) -> jax.Array:
    return _pool_window(x_BxHxWxC, -jnp.inf, jax.lax.max, stride, padding)


def batch_norm_inference(x, weight, bias, running_mean, running_var, eps: float = BN_EPS):
    scale = weight * jax.lax.rsqrt(running_var + eps)
    return x * scale + (bias - running_mean * scale)


# ----------------------------------------------------------------------------------------------
# Modules. Attribute names mirror the torch module names so that rules_from_model maps
# ``Mixed_5b.branch1x1.conv.kernel`` to ``Mixed_5b.branch1x1.conv.weight``.

class FrozenBatchNorm(nnx.Module):
    """Inference batch norm; the statistics are Params only so that strict loading covers them."""

    def __init__(self, channels: int):
        self.weight = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.running_mean = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.running_var = nnx.Param(jnp.ones((channels,), jnp.float32))

    def __call__(self, x):
        return batch_norm_inference(x, self.weight[...], self.bias[...],
                                    self.running_mean[...], self.running_var[...])


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nnx.Module):
    """Conv (no bias) -> inference batch norm (eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel, *, stride: int = 1, padding=0,
                 rngs: nnx.Rngs):
        ph, pw = _pair(padding)
        # Full float32 convs: TPU/GPU default precision (bf16/TF32 passes) would shift the
        # features, and FID is compared across implementations at float32 accuracy.
        self.conv = nnx.Conv(cin, cout, _pair(kernel), strides=stride,
                             padding=((ph, ph), (pw, pw)), use_bias=False,
                             precision=jax.lax.Precision.HIGHEST, rngs=rngs)
        self.bn = FrozenBatchNorm(cout)

    def __call__(self, x):
        return jax.nn.relu(self.bn(self.conv(x)))


class InceptionA(nnx.Module):
    def __init__(self, cin: int, pool_features: int, *, rngs: nnx.Rngs):
        self.branch1x1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1, rngs=rngs)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
        self.branch_pool = BasicConv2d(cin, pool_features, 1, rngs=rngs)

    def __call__(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([self.branch1x1(x), b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
    def __init__(self, cin: int, *, rngs: nnx.Rngs):
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), b3, max_pool_3x3(x, stride=2)], axis=-1)


class InceptionC(nnx.Module):
    def __init__(self, cin: int, c7: int, *, rngs: nnx.Rngs):
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row, rngs=rngs)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col, rngs=rngs)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col, rngs=rngs)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row, rngs=rngs)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col, rngs=rngs)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row, rngs=rngs)
        self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

    def __call__(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                     self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = conv(bd)
        bp = self.branch_pool(avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([self.branch1x1(x), b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):
    def __init__(self, cin: int, *, rngs: nnx.Rngs):
        self.branch3x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for conv in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                     self.branch7x7x3_4):
            b7 = conv(b7)
        return jnp.concatenate([b3, b7, max_pool_3x3(x, stride=2)], axis=-1)


class InceptionE(nnx.Module):
    """``max_pool_branch=True`` is the FID graph's last block (Mixed_7c), whose pool branch is a
    3x3 max pool; the block before it (Mixed_7b) averages without the padded zeros."""

    def __init__(self, cin: int, *, max_pool_branch: bool, rngs: nnx.Rngs):
        self.max_pool_branch = max_pool_branch
        self.branch1x1 = BasicConv2d(cin, 320, 1, rngs=rngs)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1, rngs=rngs)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
        pooled = (max_pool_3x3(x, stride=1, padding=1) if self.max_pool_branch
                  else avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], axis=-1)


class FIDInceptionV3(nnx.Module):
    """Preprocessed images (B, H, W, 3) in [-1, 1], H, W >= 75 -> pool3 features (B, 2048)."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
        self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
        self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
        self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
        self.Mixed_6a = InceptionB(288, rngs=rngs)
        self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
        self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
        self.Mixed_7a = InceptionD(768, rngs=rngs)
        self.Mixed_7b = InceptionE(1280, max_pool_branch=False, rngs=rngs)
        self.Mixed_7c = InceptionE(2048, max_pool_branch=True, rngs=rngs)

    def __call__(self, x_BxHxWx3):
        if x_BxHxWx3.ndim != 4 or x_BxHxWx3.shape[-1] != 3 or min(x_BxHxWx3.shape[1:3]) < 75:
            raise ValueError(f"images: expected (B, H >= 75, W >= 75, 3), found shape "
                             f"{x_BxHxWx3.shape}")
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x_BxHxWx3)))
        x = max_pool_3x3(x, stride=2)
        x = max_pool_3x3(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = block(x)
        return jnp.mean(x, axis=(1, 2))


# ----------------------------------------------------------------------------------------------
# Weights.

class WeightsNotFoundError(FileNotFoundError, ValueError):
    """A missing weights file: a FileNotFoundError, and a ValueError like every other bad
    argument, so callers catching either see it."""


def abstract_model() -> FIDInceptionV3:
    """The module's structure without allocating or initialising its 22M parameters."""
    return nnx.eval_shape(lambda: FIDInceptionV3(rngs=nnx.Rngs(0)))


def expected_state_dict_shapes(model: FIDInceptionV3 | None = None) -> dict[str, tuple]:
    """torch key -> torch shape of every tensor the network needs (fc and counters excluded)."""
    model = abstract_model() if model is None else model
    shapes = common.param_paths(model)
    out = {}
    for rule in common.rules_from_model(model):
        dummy = np.broadcast_to(np.zeros((), np.float32), shapes[rule.path])
        out[rule.torch_key] = tuple(rule.to_torch(dummy).shape)
    return out


def load_inception_state_dict(model: FIDInceptionV3, state_dict) -> FIDInceptionV3:
    """Strictly loads pytorch-fid keys into ``model`` (in place); see IGNORED_KEYS."""
    ignore = set(IGNORED_KEYS) | {k for k in state_dict if k.endswith(IGNORED_SUFFIX)}
    return common.load_into_model(model, state_dict, common.rules_from_model(model),
                                  ignore=ignore, what="FID Inception state dict")


def load_fid_inception(weights_path: str | os.PathLike) -> FIDInceptionV3:
    """The FID network with weights from a pytorch-fid ``.pth`` or an ``.npz`` of its keys."""
    if not weights_path or not os.path.isfile(weights_path):
        raise WeightsNotFoundError(f"weights_path: expected an existing FID Inception weights file "
                                f"(pytorch-fid's pt_inception-2015-12-05-*.pth or an .npz of its "
                                f"keys), found {weights_path!r}")
    try:
        state_dict = common.load_state_dict_file(weights_path)
    except ValueError as err:
        raise ValueError(f"weights_path: {err}") from err
    model = FIDInceptionV3(rngs=nnx.Rngs(0))
    try:
        return load_inception_state_dict(model, state_dict)
    except ValueError as err:
        raise ValueError(f"weights_path {os.fspath(weights_path)!r} is not a pytorch-fid "
                         f"Inception state dict: {err}") from err
