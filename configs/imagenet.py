"""The official VAR ImageNet recipes (README launch table), one module for every depth: the
config argument is d16, d20, d24, d30 (256px) or d36 (shared AdaLN, 512px); model sizes come
from VARConfig.official. Compute is bfloat16 with the flash attention backend (cuDNN on GPUs);
`--config.var.bf16=False --config.var.model.attn_backend=exact` gives the float32 reference.

    python scripts/train.py --config=configs/imagenet.py:d16 --workdir=runs/var_d16 \
        --stage=var --config.data.root=/data/imagenet \
        --config.var.tokenizer_workdir=runs/vqvae

On several hosts, run the same command on each with --coordinator_address=HOST0:PORT
--num_processes=N --process_id=I (not needed on a TPU pod or under Slurm), and split the
devices with e.g. --config.mesh.fsdp=8. The tokenizer is the released vae_ch160v4096z32
(convert it with var_jax.convert, or train one with --stage=tokenizer). Epoch counts become
steps at 1,281,167 images per epoch.
"""

import math

from var_jax.models.var import VARConfig
from var_jax.train.config import base_config

IMAGENET_TRAIN = 1_281_167
# depth: (batch, epochs, tblr, alng, wpe, twde)
RECIPES = {
    "d16": (768, 200, 1e-4, 1e-3, 0.1, 0.05),
    "d20": (768, 250, 1e-4, 1e-3, 0.1, 0.05),
    "d24": (768, 350, 8e-5, 1e-4, 0.01, 0.05),
    "d30": (1024, 350, 8e-5, 1e-5, 0.01, 0.08),
    "d36": (768, 350, 8e-5, 5e-6, 0.01, 0.08),
}


def get_config(arg: str | None = "d16"):
    arg = arg or "d16"
    if arg not in RECIPES:
        raise ValueError(f"config argument: expected one of {sorted(RECIPES)}, found {arg!r}")
    batch, epochs, tblr, alng, wpe, twde = RECIPES[arg]
    depth = int(arg[1:])
    model = VARConfig.official(depth, shared_aln=depth == 36, init_alng=alng,
                               cond_drop_rate=0.1, attn_backend="flash")
    patch_nums = model.patch_nums
    image_size = 16 * patch_nums[-1]
    steps_per_epoch = math.ceil(IMAGENET_TRAIN / batch)
    c = base_config()
    c.data.source = "image_folder"
    c.data.image_size = image_size
    c.data.train_split = "train"
    c.data.eval_split = "val"
    c.data.num_threads = 16
    c.data.eval_batch_size = 64
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.train.log_every = 100
    c.train.checkpoint_every = 10 * steps_per_epoch
    c.train.keep_checkpoints = 3
    c.train.eval_every = 10 * steps_per_epoch
    c.train.sample_every = 10 * steps_per_epoch
    c.tokenizer.model.update(dict(patch_nums=patch_nums, image_size=image_size))
    fields = dict(model.to_dict(), patch_nums=patch_nums)
    del fields["attn_options"]  # the backend's defaults
    c.var.model.update(fields)
    c.var.steps = epochs * steps_per_epoch
    c.var.batch_size = batch
    c.var.base_lr = tblr
    c.var.warmup_steps = (epochs // 50) * steps_per_epoch
    c.var.wp0 = 0.005
    c.var.wpe = wpe
    c.var.twd = 0.05
    c.var.twde = twde
    c.var.bf16 = True
    c.var.eval_examples = 50000
    c.sample.cfg = 1.5
    c.sample.top_k = 900
    c.sample.top_p = 0.96
    return c
