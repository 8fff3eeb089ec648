"""How a run stops when asked: SIGINT (Ctrl-C), SIGTERM (a preemption notice) and SIGHUP
(the terminal closed) set a flag that the loop reads between steps (`Interrupt`), so the
step in flight finishes and a checkpoint is saved; a second signal of the same kind stops
at once (`SecondSignal`)."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils



class SecondSignal(KeyboardInterrupt):
    """The second SIGINT, SIGTERM or SIGHUP of a run: it stops at once, the process exiting
    with `exit_status` (128 + the signal, as a shell reports a process the signal ended)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.exit_status = 128 + signum


class Interrupt:
    """SIGINT (Ctrl-C), SIGTERM (a preemption notice: a Spot VM's shutdown, SLURM's
    or Kubernetes' stop) and SIGHUP (the terminal closed) set a flag the loop reads between
    steps; a second signal of the same kind aborts at once (`SecondSignal`). In a
    multi-process run, SIGTERM is left to JAX's preemption service (`jax.distributed.initialize`
    starts it and it takes SIGTERM as its notice: a Python handler would take the signal from
    it), which the loop asks at every step."""

    def __init__(self) -> None:
        self.requested: int | None = None  # the signal that asked for the stop
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "Interrupt":
        def handler(signum: int, frame: Any) -> None:
            if self.requested == signum:
                raise SecondSignal(signum)
            if signum == signal.SIGHUP:
                _leave_the_terminal()
            self.requested = signum

        signals = [signal.SIGINT, signal.SIGHUP] + ([signal.SIGTERM] if jax.process_count() == 1 else [])
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread: no handler, signals behave as usual
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def stop_now(self, step: int) -> bool:
        """Whether the run stops after `step`. In a multi-process run every process
        must stop at the same step (the checkpoint save is collective: a process that
        stops alone leaves the others waiting in it), so a Ctrl-C on any process stops
        them all (the flag travels with one small all-gather per step), and a SIGTERM
        to any of them stops all at the step the preemption service agrees on."""
        if jax.process_count() == 1:
            return self.requested is not None

        if multihost_utils.reached_preemption_sync_point(step):
            self.requested = int(signal.SIGTERM)
        local = np.int32(self.requested in (signal.SIGINT, signal.SIGHUP))
        return bool(np.any(multihost_utils.process_allgather(local))) or self.requested is not None

    @property
    def exit_status(self) -> int:
        """128 + the signal number, as a shell reports a process the signal ended."""
        return 128 + int(self.requested or signal.SIGINT)


def _leave_the_terminal() -> None:
    """Points stdout and stderr at /dev/null where they are a terminal (a character device):
    after SIGHUP it is gone, and a write to it would fail (EIO) before the checkpoint is saved.
    Pipes and files (nohup, tee, a log) keep the run's last lines."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            with contextlib.suppress(OSError):
                if stat.S_ISCHR(os.fstat(fd).st_mode):
                    os.dup2(devnull, fd)
    finally:
        os.close(devnull)
