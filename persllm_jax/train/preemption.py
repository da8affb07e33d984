"""Preemption-safe training: on SIGTERM the SFT / DPO loop finishes its step, checkpoints, and stops.

TPU VMs are preempted and spot GPUs reclaimed with a SIGTERM and a grace period. One process: a SIGTERM handler
sets a flag that the loop reads after each step. Several processes (multi-host): JAX's distributed runtime
catches the signal on whichever host gets it and orbax's `CheckpointManager.reached_preemption(step)` tells every
process at the same step, so all of them save that step together.

The loop then raises `Preempted`; cli/train.py and cli/reproduce.py print one line and exit with PREEMPTED_EXIT
(75, EX_TEMPFAIL: "try again"), so a wrapper like `persllm train sft ... && persllm export ...` does not go on with
a partial run. `Preempted` is deliberately not a PersllmError (those exit 1: the user's input is wrong; here it is
not). Rerunning the same command resumes from the checkpoint (`persllm reproduce` resumes the interrupted stage:
the exception passes through its stage, which stays "started").
"""

from __future__ import annotations

import contextlib
import signal
import threading

PREEMPTED_EXIT = 75


class Preempted(Exception):
    """Raised by the train loop after the preemption checkpoint is written."""

    def __init__(self, step: int, total: int, run_dir):
        self.step, self.total, self.run_dir = step, total, run_dir
        super().__init__(f"preempted (SIGTERM) at step {step} of {total}: checkpoint {run_dir}/checkpoints/{step} "
                         f"written; rerun the same command to resume")


class Watch:
    """`stop(step, mgr)`: whether to checkpoint and stop after `step` (call once per step on every process)."""

    def __init__(self, log=print):
        self.requested, self.log = False, log

    def _handler(self, signum, frame):
        if not self.requested:
            self.log(f"{signal.Signals(signum).name} received: finishing this step, then writing a checkpoint")
        self.requested = True

    def stop(self, step: int, mgr) -> bool:
        import jax

        if jax.process_count() > 1:
            return bool(mgr.reached_preemption(step)) or self.requested
        return self.requested


@contextlib.contextmanager
def watch(log=print):
    """A Watch with a SIGTERM handler for the duration (single process, main thread; multi-process runs leave the
    signal to JAX's preemption notifier and ask orbax)."""
    import jax

    w = Watch(log)
    install = threading.current_thread() is threading.main_thread() and jax.process_count() == 1
    old = signal.signal(signal.SIGTERM, w._handler) if install else None
    try:
        yield w
    finally:
        if install:
            signal.signal(signal.SIGTERM, old)


__all__ = ["PREEMPTED_EXIT", "Preempted", "Watch", "watch"]
