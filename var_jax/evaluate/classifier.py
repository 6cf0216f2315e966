"""A small CNN classifier trained by the project, used to score generated images.

It reads the mean of the RGB channels (the demo data is grayscale), so it judges shapes, not
colours. `features` is the 128-d penultimate layer used for the Frechet distance.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


class Classifier(nnx.Module):
    """Two strided convs and two dense layers: cheap enough to train in minutes on a CPU."""

    def __init__(self, image_size: int, num_classes: int, width: int = 32, *, rngs: nnx.Rngs):
        if image_size % 4:
            raise ValueError(f"image_size: expected a multiple of 4, found {image_size}")
        self.conv1 = nnx.Conv(1, width, (5, 5), strides=(2, 2), rngs=rngs)
        self.conv2 = nnx.Conv(width, 2 * width, (3, 3), strides=(2, 2), rngs=rngs)
        self.fc = nnx.Linear((image_size // 4) ** 2 * 2 * width, 128, rngs=rngs)
        self.out = nnx.Linear(128, num_classes, rngs=rngs)

    def features(self, images_BxHxWx3):
        x = jnp.mean(images_BxHxWx3, axis=-1, keepdims=True)
        x = nnx.relu(self.conv1(x))
        x = nnx.relu(self.conv2(x))
        return nnx.relu(self.fc(x.reshape(x.shape[0], -1)))

    def __call__(self, images_BxHxWx3):
        return self.out(self.features(images_BxHxWx3))


def train_classifier(iterator, *, image_size: int, num_classes: int, steps: int, lr: float,
                     seed: int, log_every: int = 200) -> Classifier:
    """Adam with a cosine decay on cross-entropy, reading batches from `iterator`."""
    model = Classifier(image_size, num_classes, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    tx = optax.adam(optax.cosine_decay_schedule(lr, steps))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, images, labels):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p)(images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    t = time.time()
    for i in range(steps):
        batch = next(iterator)
        params, opt_state, loss = step(params, opt_state, batch["image"], batch["label"])
        if (i + 1) % log_every == 0:
            print(f"[classifier] step {i + 1}/{steps} loss={float(loss):.4f} "
                  f"({time.time() - t:.0f}s)", flush=True)
    return nnx.merge(graphdef, params)


def _batched(fn, images, batch_size: int):
    outs = []
    for i in range(0, len(images), batch_size):
        outs.append(np.asarray(fn(jnp.asarray(images[i:i + batch_size]))))
    return np.concatenate(outs)


def predict(model: Classifier, images_NxHxWx3, batch_size: int = 500) -> np.ndarray:
    graphdef, params = nnx.split(model)
    fn = jax.jit(lambda x: jnp.argmax(nnx.merge(graphdef, params)(x), -1))
    return _batched(fn, images_NxHxWx3, batch_size)


def features(model: Classifier, images_NxHxWx3, batch_size: int = 500) -> np.ndarray:
    graphdef, params = nnx.split(model)
    fn = jax.jit(lambda x: nnx.merge(graphdef, params).features(x))
    return _batched(fn, images_NxHxWx3, batch_size)


def accuracy(model: Classifier, images_NxHxWx3, labels_N) -> float:
    return float(np.mean(predict(model, images_NxHxWx3) == np.asarray(labels_N)))
