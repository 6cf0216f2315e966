"""Trains one stage (tokenizer or VAR) from a config file; resumes automatically from --workdir.

    python scripts/train.py --config=configs/demo_fashion_mnist.py --workdir=runs/demo \
        --stage=tokenizer --config.tokenizer.steps=100

Any config field can be set with --config.x=y (model fields too, e.g.
--config.var.model.attn_backend=flash). On several hosts run the same command on each with
--coordinator_address=HOST0:PORT --num_processes=N --process_id=I (or the JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID variables; nothing on a TPU pod or under Slurm). SIGTERM saves
a checkpoint and exits with status 0; the same command resumes. --dry_run checks the config and
the flags, and stops before any device work.
"""

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from var_jax.train import distributed  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (checkpoints, metrics).")
_STAGE = flags.DEFINE_enum("stage", "tokenizer", ["tokenizer", "var"], "What to train.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Validate the config and flags, then stop.")
distributed.define_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    if _DRY_RUN.value:
        from var_jax.train import config as config_lib

        config_lib.validate(_CONFIG.value)
        print(f"dry run: config valid, stage={_STAGE.value}")
        return
    distributed.initialize_from_flags()  # before any device work
    from var_jax.train import runner

    summary = runner.run_stage(_CONFIG.value, _WORKDIR.value, _STAGE.value)
    if distributed.is_primary():
        print(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    app.run(main)
