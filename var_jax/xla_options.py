"""XLA compiler options the project sets, and the one rule for when they apply.

On a CPU, XLA runs convolutions through its YNNPACK library fusions by default. For the VQ-VAE's
3x3 convolutions XLA's own convolutions are faster on the CPUs measured, while the transformer's
small-row matmuls are as fast or faster with the library (docs/sampling_benchmark.md,
docs/train_benchmark.md): the released decoder at 256 px, float32, 1.83 against 2.41 s; the demo
tokenizer's train step 0.86x the default's time (2-core Intel Xeon, both programs interleaved in
one process). So the VQ-VAE's float32 programs that take the time, its training step and the
sampler's decoder, compile without those fusions on a CPU; everything else keeps XLA's defaults.

The option is experimental: where an XLA no longer knows it, the program is compiled with the
defaults and the fallback is remembered for the rest of the process.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# (name, value) pairs, hashable so that compiled functions can be cached on them.
CPU_CONVOLUTIONS = (("xla_cpu_experimental_ynn_fusion_type", ""),)
_known = {"convolutions": True}


def convolution_options(floating_dtypes) -> tuple:
    """The options for a convolutional program whose floating arrays have ``floating_dtypes``:
    :data:`CPU_CONVOLUTIONS` on a CPU when they are all float32 (no other precision was
    measured), else none."""
    dtypes = [jnp.dtype(d) for d in floating_dtypes]
    if (_known["convolutions"] and jax.default_backend() == "cpu"
            and all(d == jnp.float32 for d in dtypes)):
        return CPU_CONVOLUTIONS
    return ()


def _unknown_option(error: Exception) -> bool:
    return "No such compile option" in str(error)


def forget_unknown(options: tuple, error: Exception) -> bool:
    """True (and these options are not offered again) when ``error`` says that XLA does not know
    one of ``options``; False when the error is something else, which the caller re-raises."""
    if options and _unknown_option(error):
        _known["convolutions"] = False
        return True
    return False


def compile_lowered(lowered, options: tuple):
    """``lowered.compile()`` with ``options``, or with XLA's defaults where it does not know
    them."""
    if options:
        try:
            return lowered.compile(compiler_options=dict(options))
        except jax.errors.JaxRuntimeError as error:
            if not forget_unknown(options, error):
                raise
    return lowered.compile()
