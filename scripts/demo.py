"""The README's main command: tokenizer, then VAR, on Fashion-MNIST, then the evaluation.

    python scripts/demo.py --workdir=runs/demo [--config=configs/demo_fashion_mnist.py]

Trains (or resumes) both stages, trains the scoring classifier, writes a 10 classes x 8 sample
grid, sample accuracy at several CFG scales and the Frechet distance in classifier features, and
prints where everything is. Falls back to scikit-learn digits when Fashion-MNIST is missing.
"""

import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from var_jax.train import demo, distributed, preemption  # noqa: E402

_DEFAULT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "configs", "demo_fashion_mnist.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Output directory.")
distributed.define_flags()


def main(argv):
    del argv
    t = time.time()
    preemption.catch_sigterm()
    distributed.initialize_from_flags()  # before any device work
    report = demo.run_demo(_CONFIG.value, _WORKDIR.value)
    print(json.dumps(report, indent=1, default=str))
    print(f"demo finished in {(time.time() - t) / 60:.1f} min; outputs in "
          f"{os.path.abspath(_WORKDIR.value)}:")
    for name, path in report["outputs"].items():
        print(f"  {name}: {path}")


if __name__ == "__main__":
    app.run(main)
