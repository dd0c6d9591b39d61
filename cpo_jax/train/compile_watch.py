"""Counts XLA compilations, so a training loop can tell a recompiling step from a warm one.

A step that recompiles after its first call (a batch whose shape or dtype changed, a weak type,
a sharding that moved) costs seconds to minutes each time on a pod and shows only as a slow
step. `CompileCounter` counts the backend compilations that happen in the calling thread
(JAX compiles a jitted function synchronously, in the thread that calls it), so Orbax's or
Grain's background threads never count toward the step that the loop is timing.
"""

from __future__ import annotations

import threading

import jax

_EVENT = '/jax/core/compile/backend_compile_duration'
_local = threading.local()


def _on_event(event: str, duration_secs: float, **kwargs) -> None:
  del duration_secs, kwargs
  if event == _EVENT:
    _local.count = getattr(_local, 'count', 0) + 1


jax.monitoring.register_event_duration_secs_listener(_on_event)


def compiles_so_far() -> int:
  """Backend compilations in this thread since the process started."""
  return getattr(_local, 'count', 0)


class CompileCounter:
  """Compilations inside `with counter:` blocks (this thread only), summed over the blocks."""

  def __init__(self):
    self.total = 0
    self._start = None

  def __enter__(self):
    self._start = compiles_so_far()
    return self

  def __exit__(self, *exc):
    self.total += compiles_so_far() - self._start
