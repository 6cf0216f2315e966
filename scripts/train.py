"""Trains one stage (tokenizer or VAR) from a config file; resumes automatically from --workdir.

    python scripts/train.py --config=configs/demo_fashion_mnist.py --workdir=runs/demo \
        --stage=tokenizer --config.tokenizer.steps=100

Any config field can be set with --config.x=y (model fields too, e.g.
--config.var.model.attn_backend=flash). On several hosts run the same command on each with
--coordinator_address=HOST0:PORT --num_processes=N --process_id=I (or the JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID variables; nothing on a TPU pod or under Slurm). SIGTERM saves
a checkpoint and exits with status 0; the same command resumes. --dry_run checks the config and
the flags, and stops before any device work. Compiled programs are kept in JAX's persistent
cache (--compilation_cache=DIR, or false), so a second run on the machine starts in seconds.
"""

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from var_jax import compile_cache
from var_jax.train import distributed, preemption


def parse_flags(argv: list[str]) -> flags.FlagValues:
    """The flags of one run in their own FlagValues, so `run` can be called more than once in
    a process (the tests do, one mesh after another)."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True,
                                    flag_values=fv, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "Output directory (checkpoints, metrics).",
                        flag_values=fv)
    flags.DEFINE_enum("stage", "tokenizer", ["tokenizer", "var"], "What to train.",
                      flag_values=fv)
    flags.DEFINE_bool("dry_run", False, "Validate the config and flags, then stop.",
                      flag_values=fv)
    distributed.define_flags(fv)
    compile_cache.define_flag(fv)
    flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)
    fv(argv)
    return fv


def run(argv: list[str]) -> dict | None:
    fv = parse_flags(argv)
    if fv.dry_run:
        from var_jax.train import config as config_lib

        config_lib.validate(fv.config)
        print(f"dry run: config valid, stage={fv.stage}")
        return None
    preemption.catch_sigterm()  # a preemption during start-up still ends in a save, status 0
    distributed.initialize_from_flags(fv)  # before any device work
    compile_cache.enable(fv.compilation_cache)
    from var_jax.train import runner

    summary = runner.run_stage(fv.config, fv.workdir, fv.stage)
    if distributed.is_primary():
        print(json.dumps(summary, indent=1, default=str), flush=True)
    return summary


def _parse_or_exit(argv):
    try:
        parse_flags(argv)  # report flag errors the absl way, before main
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        # ml_collections reports an unknown --config.x field as an AttributeError naming x.
        sys.stderr.write(f"FATAL Flags parsing error: {type(e).__name__}: {e}\n")
        sys.exit(1)
    flags.FLAGS.mark_as_parsed()
    return argv


def main(argv):
    run(argv)  # returns None so that absl exits with status 0


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_or_exit)
