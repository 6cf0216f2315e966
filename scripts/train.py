"""Trains one stage (tokenizer or VAR) from a config file; resumes automatically from --workdir.

    python scripts/train.py --config=configs/demo_fashion_mnist.py --workdir=runs/demo \
        --stage=tokenizer [--config.tokenizer.steps=100 ...]
"""

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from var_jax.train import runner  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (checkpoints, metrics).")
_STAGE = flags.DEFINE_enum("stage", "tokenizer", ["tokenizer", "var"], "What to train.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    summary = runner.run_stage(_CONFIG.value, _WORKDIR.value, _STAGE.value)
    print(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    app.run(main)
