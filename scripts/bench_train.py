"""Training throughput of the VAR transformer: images/s, step time, compiled memory and MFU.

The step is the training system's own (var_jax.train.step: AdamW with the official decay groups,
global-norm clip 2.0, donation, the non-finite guard) on a ("data", "fsdp") mesh of every
device, fed random tokens and teacher-forcing inputs of the right shapes (the frozen tokenizer's
cost is left out, as it is a fixed per-image encode). Model FLOPs per image are
6 x parameters x L (forward + backward of every matmul weight) plus block-causal attention,
3 x 4 x width x sum_k n_k x end_k per layer (QK^T and AV over the tokens each query sees); MFU
divides the achieved FLOP/s by --peak_tflops, or by a measured matmul rate on CPUs.

    python scripts/bench_train.py --depth=16 --batch=32 --dtype=bfloat16 --attn_backend=flash
    python scripts/bench_train.py --depth=16 --batch=1 --steps=2 --dtype=float32   # CPU
    python scripts/bench_train.py --depth=16 --batch=8 --dtype=float32 --remat=full \
        --compile_only --compilation_cache=false   # compile time and compiled memory only

"compile_s" is lowering + compiling the step from scratch (with --compilation_cache=false);
--scan_layers=false compiles the looped layout (depth copies of the block) for comparison.
"""

import json
import time

from absl import app, flags

from var_jax import attention
from var_jax.models import var as var_lib

_DEPTH = flags.DEFINE_integer("depth", 16, "VAR depth (official sizes: width 64 x depth).")
_BATCH = flags.DEFINE_integer("batch", 32, "Global batch size.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Compute dtype.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after one warm-up step).")
_BACKEND = flags.DEFINE_enum("attn_backend", "flash", list(attention.BACKENDS),
                             "Attention backend.")
_SCAN = flags.DEFINE_bool("scan_layers", True, "Stacked blocks under one scan (False: loop).")
_REMAT = flags.DEFINE_enum("remat", "none", list(var_lib.REMAT_POLICIES),
                           "Rematerialisation policy of the blocks.")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False,
                                  "Stop after compiling: compile time and compiled memory.")
_FSDP = flags.DEFINE_integer("fsdp", 1, "Size of the fsdp mesh axis (the rest is data).")
_PEAK = flags.DEFINE_float("peak_tflops", None,
                           "Peak dense TFLOP/s of one device; default: a table for known "
                           "accelerators, a measured matmul rate on CPUs.")
_OUT = flags.DEFINE_string("out", None, "Optional JSON file for the figures.")

# Dense bf16 peaks (TFLOP/s per chip) from the vendors' data sheets.
PEAKS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0,
         "TPU v5p": 459.0, "TPU v6 lite": 918.0}


def attention_flops_per_image(patch_nums, width: int, depth: int) -> float:
    from var_jax import scales

    layout = scales.token_layout(patch_nums)
    pairs = sum((e - b) * e for b, e in layout.begin_ends)  # (query, key) pairs seen
    return 3.0 * depth * 4.0 * width * pairs


def measured_matmul_tflops(dtype) -> float:
    import jax
    import jax.numpy as jnp

    a = jnp.ones((1024, 1024), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(5):
        out = f(a)
    out.block_until_ready()
    return 5 * 2 * 1024**3 / (time.perf_counter() - t) / 1e12


def main(argv):
    del argv
    from var_jax import compile_cache

    compile_cache.enable(flags.FLAGS.compilation_cache)
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np

    from var_jax import scales
    from var_jax.train import optim, sharding
    from var_jax.train import step as step_lib

    config = var_lib.VARConfig.official(_DEPTH.value, attn_backend=_BACKEND.value,
                                        dtype=_DTYPE.value, scan_layers=_SCAN.value,
                                        remat=_REMAT.value)
    length = scales.token_layout(config.patch_nums).seq_len
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=_FSDP.value)))
    batch_size = _BATCH.value
    sharding.check_local_batch(batch_size, mesh)
    lr = optim.lin0_schedule(1e-4, 1000, 10)
    tx = optim.make_optimizer(lr=lr, wd=0.05, b1=0.9, b2=0.95, clip=2.0,
                              mask=var_lib.weight_decay_mask)

    def create(key):
        from flax import nnx

        return var_lib.VAR(config, rngs=nnx.Rngs(params=key))

    def loss(model, frozen, batch, key):
        logits = model(batch["label"], batch["x"], deterministic=False, rngs=key)
        return jnp.mean(var_lib.token_cross_entropy(logits, batch["targets"])), {}

    holder = {}

    def init(key):
        graphdef, state = step_lib.init_state(create, tx, key)
        holder["graphdef"] = graphdef
        return state

    key = jax.random.key(0)
    abstract = jax.eval_shape(init, key)
    shardings = sharding.state_shardings(abstract, mesh, 2**14)
    # Compile-only runs never allocate the state (a d16 step at batch 8 needs ~25 GiB without
    # remat): the step is lowered on shapes.
    state = abstract if _COMPILE_ONLY.value else jax.jit(init, out_shardings=shardings)(key)
    num_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    rng = np.random.default_rng(0)
    local = batch_size // jax.process_count()
    batch = sharding.put_batch({
        "label": rng.integers(0, config.num_classes, local, dtype=np.int32),
        "x": rng.standard_normal((local, length - 1, config.cvae), dtype=np.float32),
        "targets": rng.integers(0, config.vocab_size, (local, length), dtype=np.int32)}, mesh)
    stop = jax.make_array_from_process_local_data(
        sharding.batch_sharding(mesh), np.zeros(mesh.devices.size // jax.process_count(),
                                                np.int32))
    train_step = step_lib.make_train_step(holder["graphdef"], loss, tx, lr)
    batch_sh = sharding.batch_sharding(mesh)
    t = time.perf_counter()
    compiled = jax.jit(train_step, in_shardings=(shardings, None, batch_sh, batch_sh),
                       out_shardings=(shardings, sharding.replicated(mesh)),
                       donate_argnums=(0,)).lower(state, None, batch, stop).compile()
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    if _COMPILE_ONLY.value:
        print(json.dumps({
            "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
            "depth": config.depth, "batch": batch_size, "dtype": _DTYPE.value,
            "scan_layers": _SCAN.value, "remat": _REMAT.value, "compile_s": round(compile_s, 1),
            "memory_per_device_mib": {
                "arguments": mem.argument_size_in_bytes / 2**20,
                "outputs": mem.output_size_in_bytes / 2**20,
                "temporaries": mem.temp_size_in_bytes / 2**20}}, indent=1))
        return
    state, metrics = compiled(state, None, batch, stop)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(_STEPS.value):
        t = time.perf_counter()
        state, metrics = compiled(state, None, batch, stop)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    step_s = float(np.median(times))
    flops_image = 6.0 * num_params * length + attention_flops_per_image(
        config.patch_nums, config.width, config.depth)
    achieved = flops_image * batch_size / step_s / mesh.devices.size / 1e12
    device = jax.devices()[0]
    peak, peak_source = _PEAK.value, "--peak_tflops"
    if peak is None:
        peak = next((v for k, v in PEAKS.items() if k in device.device_kind), None)
        peak_source = "data sheet"
    if peak is None:
        peak = measured_matmul_tflops(jnp.dtype(_DTYPE.value))
        peak_source = "measured 1024^3 matmul"
    result = {
        "device": f"{jax.device_count()} x {device.device_kind}", "depth": config.depth,
        "params": int(num_params), "tokens_per_image": length, "batch": batch_size,
        "dtype": _DTYPE.value, "attn_backend": _BACKEND.value, "mesh": dict(mesh.shape),
        "scan_layers": _SCAN.value, "remat": _REMAT.value,
        "compile_s": round(compile_s, 1), "step_s": step_s, "step_s_all": times,
        "images_per_s": batch_size / step_s, "model_tflop_per_image": flops_image / 1e12,
        "achieved_tflops_per_device": achieved, "peak_tflops": peak,
        "peak_source": peak_source, "mfu": achieved / peak, "loss": float(metrics["loss"]),
        "memory_per_device_mib": {
            "arguments": mem.argument_size_in_bytes / 2**20,
            "outputs": mem.output_size_in_bytes / 2**20,
            "aliased": mem.alias_size_in_bytes / 2**20,
            "temporaries": mem.temp_size_in_bytes / 2**20} if mem is not None else None,
    }
    print(json.dumps(result, indent=1))
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(result, f, indent=1)


def _define_cache_flag():
    from var_jax import compile_cache

    compile_cache.define_flag()


_define_cache_flag()

if __name__ == "__main__":
    app.run(main)
