"""Evaluation: Frechet distance against closed forms, the classifier, sample scores, FID's
honest unavailability."""

import ml_collections
import numpy as np
import pytest

from var_jax import data
from var_jax.evaluate import classifier, fid, frechet, sample_metrics


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    # Diagonal covariances commute: d^2 = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    a, b = rng.uniform(0.5, 2, 4), rng.uniform(0.5, 2, 4)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet.frechet_distance_from_stats(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(want, rel=1e-10)
    # General SPD matrices: tr sqrt(S1 S2) = sum of sqrt of the (real, positive) eigenvalues.
    x, y = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = x @ x.T + 0.1 * np.eye(5), y @ y.T + 0.1 * np.eye(5)
    tr = np.sum(np.sqrt(np.linalg.eigvals(s1 @ s2).real))
    want = np.trace(s1) + np.trace(s2) - 2 * tr
    assert frechet.frechet_distance_from_stats(np.zeros(5), s1, np.zeros(5), s2) == \
        pytest.approx(want, rel=1e-8)
    feats = rng.normal(size=(200, 3))
    assert frechet.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-8)
    assert frechet.frechet_distance(feats, feats + 1.0) == pytest.approx(3.0, rel=1e-8)
    with pytest.raises(ValueError, match="features"):
        frechet.frechet_distance(feats[:1], feats)


def test_within_class_spread_against_numpy_and_its_errors():
    feats = np.array([[0.0, 1.0], [2.0, 1.0], [5.0, 5.0], [1.0, 0.0], [3.0, 4.0], [7.0, 7.0]])
    labels = np.array([0, 0, 2, 1, 1, 3])
    # Classes 2 and 3 have one example each: no spread to measure.
    got = sample_metrics.within_class_spread(feats, labels)
    assert got == pytest.approx({0: 2.0, 1: 2.0 + 8.0})
    with pytest.raises(ValueError, match="labels"):
        sample_metrics.within_class_spread(feats, labels[:-1])


def test_fid_with_missing_or_corrupt_weights_raises_clearly(tmp_path):
    with pytest.raises(ValueError, match="weights_path"):
        fid.inception_features(np.zeros((1, 8, 8, 3)), str(tmp_path / "missing.npz"))
    weights = tmp_path / "inception.npz"
    weights.write_bytes(b"x")
    with pytest.raises(ValueError, match="weights_path"):
        fid.inception_features(np.zeros((1, 8, 8, 3)), str(weights))
    rng = np.random.default_rng(1)
    real = rng.normal(size=(50, 4))
    np.savez(tmp_path / "ref.npz", mu=real.mean(0), sigma=np.cov(real, rowvar=False))
    assert fid.fid_from_reference_npz(str(tmp_path / "ref.npz"), real) == \
        pytest.approx(0.0, abs=1e-8)


def test_classifier_learns_digits_and_scores_samples():
    config = ml_collections.ConfigDict(dict(source="digits", root="", image_size=8))
    train, test = data.make_source(config, "train"), data.make_source(config, "test")
    it = data.DataIterator(data.make_dataset(train, batch_size=64, seed=0, train=True,
                                             image_size=8), train)
    model = classifier.train_classifier(it, image_size=8, num_classes=10, steps=150, lr=3e-3,
                                        seed=0, log_every=1000)
    test_batch = data.normalize({"image": test.images, "label": test.labels})
    acc = classifier.accuracy(model, test_batch["image"], test_batch["label"])
    assert acc > 0.8
    images01 = test_batch["image"] * 0.5 + 0.5
    assert sample_metrics.conditional_accuracy(model, images01, test.labels) == \
        pytest.approx(acc)
    wrong = (test.labels + 1) % 10
    assert sample_metrics.conditional_accuracy(model, images01, wrong) < 0.2
    feats = classifier.features(model, test_batch["image"])
    assert feats.shape == (len(test.labels), 128)
    same = sample_metrics.classifier_frechet(model, test_batch["image"], images01)
    noise = np.random.default_rng(0).uniform(0, 1, images01.shape).astype(np.float32)
    assert same == pytest.approx(0.0, abs=1e-3)
    assert sample_metrics.classifier_frechet(model, test_batch["image"], noise) > 1.0
    # Within-class spread: the real images against themselves, then each class collapsed onto
    # one of its images (no variety left), then only half of each class (about as varied).
    spread = sample_metrics.class_spread_ratio
    assert spread(model, test_batch["image"], test.labels, images01, test.labels) == \
        pytest.approx(1.0, rel=1e-6)
    first = {c: np.flatnonzero(test.labels == c)[0] for c in range(10)}
    collapsed = images01[[first[c] for c in test.labels]]
    assert spread(model, test_batch["image"], test.labels, collapsed, test.labels) == \
        pytest.approx(0.0, abs=1e-6)
    half = np.arange(len(test.labels)) % 2 == 0
    assert 0.7 < spread(model, test_batch["image"], test.labels, images01[half],
                        test.labels[half]) < 1.4
    with pytest.raises(ValueError, match="image_size"):
        classifier.Classifier(10, 10, rngs=__import__("flax").nnx.Rngs(0))


def test_matched_real_indices_give_the_samples_label_mix_in_order():
    real_labels = np.array([1, 0, 2, 1, 0, 1, 2, 0])
    labels = np.array([2, 0, 1, 0, 1, 1])
    idx = sample_metrics.matched_real_indices(real_labels, labels)
    np.testing.assert_array_equal(real_labels[idx], labels)
    np.testing.assert_array_equal(idx, [2, 1, 0, 4, 3, 5])  # each class's images in order
    with pytest.raises(ValueError, match="class 2: the samples have 3 images of it, the real "
                                         "set only 2"):
        sample_metrics.matched_real_indices(real_labels, np.array([2, 2, 2]))


def test_frechet_reference_holds_out_real_images_with_the_samples_label_mix():
    from flax import nnx

    config = ml_collections.ConfigDict(dict(source="digits", root="", image_size=8))
    test = data.make_source(config, "test")
    images = data.normalize({"image": test.images, "label": test.labels})["image"]
    model = classifier.Classifier(8, 10, rngs=nnx.Rngs(0))  # untrained: any features do
    labels = np.repeat(np.arange(10), 3)
    ref = sample_metrics.frechet_reference(model, images, test.labels, labels)
    held = sample_metrics.matched_real_indices(test.labels, labels)
    rest = np.setdiff1d(np.arange(len(test.labels)), held)
    feats = classifier.features(model, images)
    np.testing.assert_allclose(ref.held_out_features_KxM, feats[held], rtol=1e-6)
    np.testing.assert_allclose(ref.features_NxM, feats[rest], rtol=1e-6)
    np.testing.assert_array_equal(ref.labels_N, test.labels[rest])
    assert ref.real_floor() == pytest.approx(frechet.frechet_distance(feats[rest], feats[held]))
    # Samples that are the held-out images themselves score the floor; noise scores far more.
    sample_feats = sample_metrics.sample_features(model, images[held] * 0.5 + 0.5)
    assert ref.distance(sample_feats) == pytest.approx(ref.real_floor(), rel=1e-4)
    noise = np.random.default_rng(0).uniform(0, 1, images[held].shape).astype(np.float32)
    assert ref.distance(sample_metrics.sample_features(model, noise)) > 2 * ref.real_floor()
    assert ref.spread_ratio(sample_feats, labels) > 0
    with pytest.raises(ValueError, match="too few for a reference"):
        sample_metrics.frechet_reference(model, images[:40], test.labels[:40],
                                         test.labels[:30])
