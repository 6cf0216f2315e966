"""The README's main command: tokenizer, then VAR, on Fashion-MNIST, then the evaluation.

    python scripts/demo.py --workdir=runs/demo [--config=configs/demo_fashion_mnist.py]

Trains (or resumes) both stages, trains the scoring classifier, measures sample accuracy at
several CFG scales and the Frechet distance in classifier features, and draws four pictures
(class grid, coarse-to-fine strip, guidance sweep, tokenizer reconstructions). The terminal shows
each phase and progress line once and a summary table; the absl log goes to <workdir>/logs (or
--log_dir) at --verbosity (`--alsologtostderr` also shows it). Falls back to scikit-learn digits
when Fashion-MNIST is missing.
"""

import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

from var_jax import compile_cache
from var_jax.train import demo, distributed, preemption

_DEFAULT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "configs", "demo_fashion_mnist.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Output directory.")
distributed.define_flags()
compile_cache.define_flag()
FLAGS = flags.FLAGS


def main(argv):
    del argv
    if not (FLAGS.logtostderr or FLAGS.alsologtostderr):
        log_dir = FLAGS.log_dir or os.path.join(_WORKDIR.value, "logs")
        os.makedirs(log_dir, exist_ok=True)
        logging.get_absl_handler().use_absl_log_file("demo", log_dir)
    t = time.time()
    preemption.catch_sigterm()
    distributed.initialize_from_flags()  # before any device work
    compile_cache.enable(FLAGS.compilation_cache)
    report = demo.run_demo(_CONFIG.value, _WORKDIR.value)
    if "stopped" in report:  # SIGTERM: saved, exit 0, a rerun resumes
        return
    print(f"\ndemo finished in {(time.time() - t) / 60:.1f} min "
          f"(all figures in {report['outputs']['report']})\n", flush=True)
    print(demo.summary_table(report), flush=True)


if __name__ == "__main__":
    app.run(main)
