"""Preemption: SIGTERM (TPU maintenance, spot VMs) saves a checkpoint and ends the run cleanly.

Every host must save at the same step. On several hosts JAX's preemption service (on by
default after `jax.distributed.initialize`, listening for SIGTERM) agrees on that step:
`reached_preemption_sync_point` turns True on all hosts together. On one process a SIGTERM
handler sets a flag that the next step sees. The loop then saves at that step (all hosts) and
raises `Preempted`; main.py exits 0, and the rerun resumes from that checkpoint.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class Preempted(Exception):  # noqa: N818 (an event, not an error: the run exits 0)
  def __init__(self, stage: str, step: int):
    super().__init__(f'{stage}: preempted; saved at step {step}. Rerun the command to resume.')
    self.stage, self.step = stage, step


class Watch:
  """`with Watch() as w: ... if w.reached(step): save and raise Preempted`."""

  def __init__(self):
    self._flag = threading.Event()
    self._previous = None
    self._distributed = jax.distributed.is_initialized()

  def __enter__(self):
    # With jax.distributed, JAX's own notifier owns SIGTERM; never replace it.
    if not self._distributed and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._flag.set())
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False

  def reached(self, step: int) -> bool:
    """True at the step where every host should save and stop (call it at every step)."""
    if self._distributed:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._flag.is_set()
