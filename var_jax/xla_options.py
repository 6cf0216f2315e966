"""XLA compiler options the project sets, and the one rule for when they apply.

On a CPU, XLA runs convolutions through its YNNPACK library fusions by default. For the VQ-VAE's
3x3 convolutions XLA's own convolutions are faster on the CPUs measured, while the transformer's
small-row matmuls are as fast or faster with the library (docs/sampling_benchmark.md,
docs/train_benchmark.md): the released decoder at 256 px, float32, 1.83 against 2.41 s; the demo
tokenizer's train step 0.86x the default's time (2-core Intel Xeon, both programs interleaved in
one process). So the VQ-VAE's float32 programs that take the time, its training step and the
sampler's decoder, the tokenizer's evaluation and the VAR's token cache, compile without those
fusions on a CPU; everything else keeps XLA's defaults.

The option is experimental: where an XLA no longer knows it, the program is compiled with the
defaults and the fallback is remembered for the rest of the process.
"""

from __future__ import annotations

import functools

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


def convolution_options_for(tree) -> tuple:
    """:func:`convolution_options` for the floating leaves of a pytree (a model's state)."""
    return convolution_options(x.dtype for x in jax.tree.leaves(tree)
                               if jnp.issubdtype(x.dtype, jnp.floating))


def jit(fn, options: tuple = ()):
    """``jax.jit(fn)`` whose programs are compiled with ``options`` ((name, value) pairs), or
    with XLA's defaults where XLA does not know them (remembered, see :func:`forget_unknown`)
    and when the call is itself being traced by an outer jit (JAX takes compiler options from
    the outermost jit only). ``.lower`` lowers the program the options apply to."""
    plain = jax.jit(fn)
    if not options:
        return plain
    tuned = jax.jit(fn, compiler_options=dict(options))

    @functools.wraps(fn)
    def call(*args):
        traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args))
        if _known["convolutions"] and not traced:
            try:
                return tuned(*args)
            except jax.errors.JaxRuntimeError as error:
                if not forget_unknown(options, error):
                    raise
        return plain(*args)

    call.lower = tuned.lower
    return call


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
