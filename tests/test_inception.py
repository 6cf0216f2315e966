"""The FID Inception network: strict loading of pytorch-fid keys, a full forward on random
weights, and torch parity of its building blocks (conv+BN, the count_include_pad=False and max
pool mixed blocks, the bilinear resize)."""

import numpy as np
import pytest
from flax import nnx

from var_jax import interp
from var_jax.convert import common
from var_jax.evaluate import fid, inception


def _random_state_dict(seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in inception.expected_state_dict_shapes().items():
        if key.endswith("conv.weight"):
            fan_in = int(np.prod(shape[1:]))
            out[key] = rng.normal(0, np.sqrt(2.0 / fan_in), shape).astype(np.float32)
        elif key.endswith("running_var"):
            out[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif key.endswith("bn.weight"):
            out[key] = rng.uniform(0.8, 1.2, shape).astype(np.float32)
        else:
            out[key] = rng.normal(0, 0.1, shape).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def state_dict():
    return _random_state_dict()


@pytest.fixture(scope="module")
def weights_file(state_dict, tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception.npz"
    extra = {"fc.weight": np.zeros((1008, 2048), np.float32), "fc.bias": np.zeros(1008, np.float32),
             "Conv2d_1a_3x3.bn.num_batches_tracked": np.zeros((), np.int64)}
    np.savez(path, **state_dict, **extra)
    return str(path)


def test_expected_keys_follow_pytorch_fid_layout():
    shapes = inception.expected_state_dict_shapes()
    assert len(shapes) == 94 * 5  # 94 conv+BN units, no aux classifier, fc ignored
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Mixed_5b.branch_pool.conv.weight"] == (32, 192, 1, 1)
    assert shapes["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
    assert shapes["Mixed_7c.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)
    assert shapes["Mixed_7c.branch_pool.bn.running_var"] == (192,)


_IMAGES_SHAPE = (3, 80, 90, 3)
# 107 is the smallest input size whose last blocks still see 2x2 maps: at 75 they see 1x1, where
# the max and the padding-excluding average pools are both the identity and go untested.
_SIZE = 107


def _features(weights):
    images = np.random.default_rng(1).uniform(0, 1, _IMAGES_SHAPE).astype(np.float32)
    # batch 2 pads 3 images to 4; every call below has these shapes, so one compile serves all.
    return images, fid.inception_features(images, weights, batch_size=2, image_size=_SIZE)


def test_features_from_random_weights_file(weights_file):
    images, feats = _features(weights_file)
    assert feats.shape == (3, inception.FEATURE_DIM) and feats.dtype == np.float64
    assert np.all(np.isfinite(feats)) and np.all(feats >= 0)  # mean of ReLU outputs
    assert np.abs(feats[0] - feats[1]).max() > 1e-4 * np.abs(feats).max()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fid.inception_features(images * 2 - 1, weights_file, image_size=_SIZE)


def test_whole_network_matches_torch(tmp_path):
    torch, TNet = _torch_fid_inception()
    torch.manual_seed(0)
    net = _randomize(torch, TNet(), 5)
    path = tmp_path / "pt_inception-random.pth"
    torch.save(net.state_dict(), path)  # with fc and num_batches_tracked, as pytorch-fid's file
    images, feats = _features(str(path))
    with torch.no_grad():
        want = net(torch.from_numpy(images.transpose(0, 3, 1, 2)), _SIZE).numpy()
    np.testing.assert_allclose(feats, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_strict_loading_names_the_bad_key(state_dict):
    model = inception.abstract_model()
    bad = dict(state_dict)
    del bad["Mixed_6c.branch7x7_3.conv.weight"]
    with pytest.raises(ValueError, match=r"missing keys: 'Mixed_6c\.branch7x7_3\.conv\.weight'"):
        inception.load_inception_state_dict(model, bad)
    bad = dict(state_dict, **{"AuxLogits.conv0.conv.weight": np.zeros((128, 768, 1, 1))})
    with pytest.raises(ValueError, match=r"unexpected keys: 'AuxLogits\.conv0\.conv\.weight'"):
        inception.load_inception_state_dict(model, bad)
    bad = dict(state_dict, **{"Mixed_5b.branch1x1.bn.running_mean": np.zeros(65, np.float32)})
    want = r"wrong shape for 'Mixed_5b\.branch1x1\.bn\.running_mean'"
    with pytest.raises(ValueError, match=want):
        inception.load_inception_state_dict(model, bad)


def test_weights_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights_path"):  # also a ValueError
        fid.inception_features(np.zeros((1, 8, 8, 3)), str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="weights_path"):
        inception.load_fid_inception(str(tmp_path / "missing.pth"))
    garbage = tmp_path / "inception.npz"
    garbage.write_bytes(b"x")
    with pytest.raises(ValueError, match="weights_path"):
        fid.inception_features(np.zeros((1, 8, 8, 3)), str(garbage))
    other = tmp_path / "other.npz"
    np.savez(other, **{"encoder.conv_in.weight": np.zeros((4, 3, 3, 3), np.float32)})
    with pytest.raises(ValueError, match="not a pytorch-fid Inception state dict"):
        inception.load_fid_inception(str(other))


def test_fid_of_identical_features_is_zero():
    feats = np.random.default_rng(2).normal(size=(64, 16))
    assert fid.fid_from_features(feats, feats) == pytest.approx(0.0, abs=1e-8)
    assert fid.fid_from_features(feats, feats + 0.5) == pytest.approx(16 * 0.25, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# Parity with blocks built from torch.nn layers (the torchvision / pytorch-fid structure).

def _torch_blocks():
    torch = pytest.importorskip("torch")
    nn, F = torch.nn, torch.nn.functional

    class TBasic(nn.Module):
        def __init__(self, cin, cout, **kw):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
            self.bn = nn.BatchNorm2d(cout, eps=0.001)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))

    class TA(nn.Module):
        def __init__(self, cin, pool_features):
            super().__init__()
            self.branch1x1 = TBasic(cin, 64, kernel_size=1)
            self.branch5x5_1 = TBasic(cin, 48, kernel_size=1)
            self.branch5x5_2 = TBasic(48, 64, kernel_size=5, padding=2)
            self.branch3x3dbl_1 = TBasic(cin, 64, kernel_size=1)
            self.branch3x3dbl_2 = TBasic(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = TBasic(96, 96, kernel_size=3, padding=1)
            self.branch_pool = TBasic(cin, pool_features, kernel_size=1)

        def forward(self, x):
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            bp = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1,
                                               count_include_pad=False))
            return torch.cat([self.branch1x1(x), b5, b3, bp], 1)

    class TE(nn.Module):  # FIDInceptionE_1 (avg pool) / FIDInceptionE_2 (max pool)
        def __init__(self, cin, max_pool=True):
            super().__init__()
            self.max_pool = max_pool
            self.branch1x1 = TBasic(cin, 320, kernel_size=1)
            self.branch3x3_1 = TBasic(cin, 384, kernel_size=1)
            self.branch3x3_2a = TBasic(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3_2b = TBasic(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch3x3dbl_1 = TBasic(cin, 448, kernel_size=1)
            self.branch3x3dbl_2 = TBasic(448, 384, kernel_size=3, padding=1)
            self.branch3x3dbl_3a = TBasic(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3dbl_3b = TBasic(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch_pool = TBasic(cin, 192, kernel_size=1)

        def forward(self, x):
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
            bp = (F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else
                  F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
            return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(bp)], 1)

    return torch, TBasic, TA, TE


def _torch_fid_inception():
    """The whole FID network from torch.nn layers (stem, A x3, B, C x4, D, E_1, E_2)."""
    torch, TBasic, TA, TE = _torch_blocks()
    nn, F = torch.nn, torch.nn.functional

    class TB(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3 = TBasic(cin, 384, kernel_size=3, stride=2)
            self.branch3x3dbl_1 = TBasic(cin, 64, kernel_size=1)
            self.branch3x3dbl_2 = TBasic(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = TBasic(96, 96, kernel_size=3, stride=2)

        def forward(self, x):
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)

    class TC(nn.Module):
        def __init__(self, cin, c7):
            super().__init__()
            row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1),
                                                                       padding=(3, 0))
            self.branch1x1 = TBasic(cin, 192, kernel_size=1)
            self.branch7x7_1 = TBasic(cin, c7, kernel_size=1)
            self.branch7x7_2 = TBasic(c7, c7, **row)
            self.branch7x7_3 = TBasic(c7, 192, **col)
            self.branch7x7dbl_1 = TBasic(cin, c7, kernel_size=1)
            self.branch7x7dbl_2 = TBasic(c7, c7, **col)
            self.branch7x7dbl_3 = TBasic(c7, c7, **row)
            self.branch7x7dbl_4 = TBasic(c7, c7, **col)
            self.branch7x7dbl_5 = TBasic(c7, 192, **row)
            self.branch_pool = TBasic(cin, 192, kernel_size=1)

        def forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            bd = self.branch7x7dbl_1(x)
            for i in range(2, 6):
                bd = getattr(self, f"branch7x7dbl_{i}")(bd)
            bp = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1,
                                               count_include_pad=False))
            return torch.cat([self.branch1x1(x), b7, bd, bp], 1)

    class TD(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3_1 = TBasic(cin, 192, kernel_size=1)
            self.branch3x3_2 = TBasic(192, 320, kernel_size=3, stride=2)
            self.branch7x7x3_1 = TBasic(cin, 192, kernel_size=1)
            self.branch7x7x3_2 = TBasic(192, 192, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7x3_3 = TBasic(192, 192, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7x3_4 = TBasic(192, 192, kernel_size=3, stride=2)

        def forward(self, x):
            b7 = x
            for i in range(1, 5):
                b7 = getattr(self, f"branch7x7x3_{i}")(b7)
            b3 = self.branch3x3_2(self.branch3x3_1(x))
            return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)

    class TNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.Conv2d_1a_3x3 = TBasic(3, 32, kernel_size=3, stride=2)
            self.Conv2d_2a_3x3 = TBasic(32, 32, kernel_size=3)
            self.Conv2d_2b_3x3 = TBasic(32, 64, kernel_size=3, padding=1)
            self.Conv2d_3b_1x1 = TBasic(64, 80, kernel_size=1)
            self.Conv2d_4a_3x3 = TBasic(80, 192, kernel_size=3)
            self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = TA(192, 32), TA(256, 64), TA(288, 64)
            self.Mixed_6a = TB(288)
            self.Mixed_6b, self.Mixed_6c = TC(768, 128), TC(768, 160)
            self.Mixed_6d, self.Mixed_6e = TC(768, 160), TC(768, 192)
            self.Mixed_7a = TD(768)
            self.Mixed_7b, self.Mixed_7c = TE(1280, max_pool=False), TE(2048, max_pool=True)
            self.fc = nn.Linear(2048, 1008)

        def forward(self, images, size):
            x = 2 * F.interpolate(images, size=(size, size), mode="bilinear",
                                  align_corners=False) - 1
            x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
            x = F.max_pool2d(x, 3, stride=2)
            x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
            for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
                x = getattr(self, f"Mixed_{name}")(x)
            return x.mean(dim=(2, 3))

    return torch, TNet


def _randomize(torch, module, seed):
    """He-normal convs and random BN statistics: with torch's default init the activations fade
    through the depth and the features would not depend on the input."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d):
            fan_in = m.weight[0].numel()
            m.weight.data = torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=gen) + 0.5
            m.bias.data = torch.randn(c, generator=gen) * 0.1
            m.running_mean.data = torch.randn(c, generator=gen) * 0.1
            m.running_var.data = torch.rand(c, generator=gen) + 0.5
    return module.eval()


def _check_parity(torch, tmodule, jmodule, x_nchw):
    state = {k: v.numpy() for k, v in tmodule.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    common.load_into_model(jmodule, state, common.rules_from_model(jmodule))
    with torch.no_grad():
        want = tmodule(torch.from_numpy(x_nchw)).numpy().transpose(0, 2, 3, 1)
    got = np.asarray(jmodule(x_nchw.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_blocks_match_torch():
    torch, TBasic, TA, TE = _torch_blocks()
    torch.manual_seed(0)
    rng = np.random.default_rng(3)
    tb = _randomize(torch, TBasic(3, 32, kernel_size=3, stride=2), 1)
    jb = inception.BasicConv2d(3, 32, 3, stride=2, rngs=nnx.Rngs(0))
    _check_parity(torch, tb, jb, rng.normal(size=(2, 3, 17, 15)).astype(np.float32))
    ta = _randomize(torch, TA(24, 16), 2)
    ja = inception.InceptionA(24, 16, rngs=nnx.Rngs(0))
    _check_parity(torch, ta, ja, rng.normal(size=(1, 24, 7, 6)).astype(np.float32))
    te = _randomize(torch, TE(16), 3)
    je = inception.InceptionE(16, max_pool_branch=True, rngs=nnx.Rngs(0))
    _check_parity(torch, te, je, rng.normal(size=(1, 16, 5, 4)).astype(np.float32))


def test_resize_matches_torch_interpolate():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    for h, w in ((32, 48), (320, 300)):  # upsampling and downsampling
        x = rng.uniform(size=(1, 3, h, w))
        want = torch.nn.functional.interpolate(torch.from_numpy(x), size=(75, 75),
                                               mode="bilinear", align_corners=False)
        want = want.numpy().transpose(0, 2, 3, 1)
        # The interpolation weights are exact in float64 ...
        exact = np.einsum("oh,pw,bchw->bopc", interp.resize_matrix(h, 75, "bilinear"),
                          interp.resize_matrix(w, 75, "bilinear"), x)
        np.testing.assert_allclose(exact, want, atol=1e-12)
        # ... and the float32 network input differs only by rounding of the source coordinates.
        got = inception.preprocess(x.transpose(0, 2, 3, 1).astype(np.float32), 75)
        np.testing.assert_allclose(np.asarray(got), 2 * want - 1, atol=2e-5)
