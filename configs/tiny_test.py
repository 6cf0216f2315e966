"""A seconds-long config for tests: scikit-learn digits at their native 8x8, a 2-level
tokenizer with scales (1, 2, 4) and a 1-block VAR.

    python scripts/train.py --config=configs/tiny_test.py --workdir=runs/tiny --stage=tokenizer
"""

from var_jax.train.config import base_config

PATCH_NUMS = (1, 2, 4)


def get_config(arg: str | None = None):
    del arg
    c = base_config()
    c.data.source = "digits"
    c.data.image_size = 8
    c.data.eval_batch_size = 16
    c.train.log_every = 1
    c.train.checkpoint_every = 2
    c.train.keep_checkpoints = 2
    c.train.sample_every = 2
    c.tokenizer.model.update(
        image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, use_attn=False,
        use_mid_attn=False, z_channels=4, vocab_size=16, patch_nums=PATCH_NUMS, norm_groups=4)
    c.tokenizer.steps = 2
    c.tokenizer.batch_size = 8
    c.tokenizer.warmup_steps = 1
    c.tokenizer.dead_code_every = 1
    c.tokenizer.eval_examples = 32
    c.var.model.update(
        depth=1, width=16, num_heads=2, patch_nums=PATCH_NUMS, vocab_size=16, cvae=4,
        num_classes=10, drop_path_rate=0.0)
    c.var.steps = 2
    c.var.batch_size = 8
    c.var.warmup_steps = 1
    c.var.eval_examples = 32
    c.sample.per_class = 1
    c.sample.eval_per_class = 2
    c.classifier.steps = 5
    c.data.num_eval = 40
    c.classifier.batch_size = 16
    return c
