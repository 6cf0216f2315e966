"""A profiler window over training steps (`train.profile_steps`, `train.profile_skip`).

Why a window and not the whole run: a trace of every step is large and slows the run, while a few
steady steps show where a step's time goes (each fused XLA computation, the host's dispatch, the
input pipeline). The first steps of a run, resumed or fresh, compile and warm up, so the window
opens `profile_skip` steps after the run's first step (as MaxText's
`skip_first_n_steps_for_profiler`). With several processes each traces its own into
profile/process_<index> (two processes on one host would otherwise write the same file).

The trace is `jax.profiler`'s: <run dir>/profile/plugins/profile/<time>/, an .xplane.pb for
TensorBoard's profile tab (`tensorboard --logdir <run dir>/profile`, with the
tensorboard-plugin-profile package) and a .trace.json.gz that https://ui.perfetto.dev opens
without it.
"""

from __future__ import annotations

import os

import jax


class StepProfiler:
    """Traces steps [first + skip, first + skip + steps) of a run that starts at step `first`
    (0-based step indices, as the loop counts them); `steps=0` does nothing."""

    def __init__(self, run_dir: str, first: int, skip: int, steps: int):
        self.dir = os.path.join(run_dir, "profile")
        if jax.process_count() > 1:
            self.dir = os.path.join(self.dir, f"process_{jax.process_index()}")
        self.begin, self.end = first + skip, first + skip + steps
        self.active = False
        self.last = None  # the last step traced (0-based)

    def before_step(self, step: int, state) -> None:
        """Opens the window before `step` runs (after the steps queued so far have finished,
        so the trace holds the window's steps alone)."""
        if step == self.begin < self.end:  # an empty window (steps=0) never opens
            jax.block_until_ready(state)
            jax.profiler.start_trace(self.dir, create_perfetto_trace=True)
            self.active = True

    def after_step(self, step: int, state) -> str | None:
        """Closes the window once `step` (the window's last) has run; see :meth:`stop`."""
        if self.active:
            self.last = step
            if step + 1 >= self.end:
                return self.stop(state)
        return None

    def stop(self, state) -> str | None:
        """Closes the window if open (a run that ends or stops inside it keeps what it traced)
        and returns a line saying what was traced where; None if nothing was open."""
        if not self.active:
            return None
        try:
            jax.block_until_ready(state)
        finally:  # the trace is closed (and written) whatever the steps raised
            jax.profiler.stop_trace()
            self.active = False
        if self.last is None:
            return f"profiler closed before any step ran ({self.dir})"
        return (f"profiled steps {self.begin + 1}-{self.last + 1} into {self.dir} (TensorBoard's "
                "profile tab, or the .trace.json.gz in ui.perfetto.dev)")
