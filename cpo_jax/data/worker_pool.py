"""An order-preserving, bounded map over worker processes (data preparation's image work).

`ordered_map` keeps at most `2 * workers` chunks in flight: it pulls the next chunk of inputs
only when a finished one is taken, so neither the inputs nor the results of a long stream pile
up in memory (multiprocessing's own `imap` reads its whole input at once and keeps every result
its caller has not taken yet). Results come back in input order whatever the number of workers.
Workers are spawned, not forked: the parent may have started JAX's threads. A spawned worker
would import the parent's `__main__` first (for `python -m cpo_jax.main`: JAX, Flax,
transformers; about 700 MB and many seconds per worker) though the work needs none of it:
`worker_pool` starts them without it, so a worker holds only the modules of its work.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import multiprocessing
import os
import sys
import types
from typing import Any
from typing import Callable
from typing import Iterable
from typing import Iterator

CHUNK = 8  # inputs per task sent to a worker: large enough to amortise the pickling round trip.
DEFAULT_MAX_WORKERS = 8


def resolve_workers(requested: int, num_inputs: int | None = None) -> int:
  """The number of worker processes to start: `requested` (-1 = min(8, CPU count)); 0 (work in
  this process) when there is one worker or too few inputs for a pool to pay for its start."""
  n = min(DEFAULT_MAX_WORKERS, _usable_cpus()) if requested < 0 else int(requested)
  if n <= 1 or (num_inputs is not None and num_inputs < 2 * CHUNK):
    return 0
  return n


def _usable_cpus() -> int:
  """CPUs this process may run on (a container's or taskset's share, not the host's count)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


@dataclasses.dataclass(frozen=True)
class Workers:
  pool: Any  # a multiprocessing Pool, or None: work in this process
  count: int


@contextlib.contextmanager
def worker_pool(count: int) -> Iterator[Workers]:
  """`count` spawned worker processes (0: none, the work runs in this process)."""
  if count <= 0:
    yield Workers(None, 0)
    return
  with _without_main_module():
    pool = multiprocessing.get_context('spawn').Pool(count)  # starts every worker now
  with pool:
    yield Workers(pool, count)


@contextlib.contextmanager
def _without_main_module():
  """While workers start, `__main__` is an empty module: spawn then has no main module to
  import in them (the functions they run must live in importable modules, as ours do)."""
  main = sys.modules['__main__']
  sys.modules['__main__'] = types.ModuleType('__main__')
  try:
    yield
  finally:
    sys.modules['__main__'] = main


def _map_chunk(fn: Callable, inputs: list) -> list:
  return [fn(x) for x in inputs]


def ordered_map(
  workers: Workers, fn: Callable, items: Iterable[tuple[Any, Any]], chunk: int = CHUNK
) -> Iterator[tuple[Any, Any]]:
  """(context, input) pairs -> (context, fn(input)), lazily and in order. `fn` runs in the
  workers (it and the inputs must pickle; contexts stay in this process), or here when there are
  none. At most 2 chunks per worker are in flight."""
  if workers.pool is None:
    for context, x in items:
      yield context, fn(x)
    return
  it = iter(items)
  pending = collections.deque()

  def submit() -> bool:
    batch = list(itertools.islice(it, chunk))
    if batch:
      contexts = [c for c, _ in batch]
      inputs = [x for _, x in batch]
      pending.append((contexts, workers.pool.apply_async(_map_chunk, (fn, inputs))))
    return bool(batch)

  for _ in range(2 * workers.count):
    if not submit():
      break
  while pending:
    contexts, result = pending.popleft()
    outputs = result.get()
    submit()
    yield from zip(contexts, outputs)
