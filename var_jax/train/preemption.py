"""SIGTERM as a request to stop: the training loop saves at a step every process agrees on and
returns, so the process exits with status 0 and a rerun resumes. No JAX import here: the entry
points install the handler before jax.distributed starts."""

from __future__ import annotations

import signal


class StopRequest:
    """SIGTERM (what a preempted TPU/spot VM gets) sets a flag instead of killing the process.

    Installed by `catch_sigterm` (the entry points call it first thing, so a signal during
    start-up is kept too) or for the duration of `Trainer.run`.
    """

    def __init__(self):
        self.requested = False
        self.installed = False

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def install(self) -> bool:
        """Installs the handler; False if it already was or cannot be (not the main thread)."""
        if self.installed:
            return False
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:
            return False
        self.installed = True
        return True

    def uninstall(self) -> None:
        if self.installed:
            signal.signal(signal.SIGTERM, self._previous)
            self.installed = False


STOP = StopRequest()


def catch_sigterm() -> None:
    """From now on SIGTERM makes the training loop save and return instead of dying."""
    STOP.install()
