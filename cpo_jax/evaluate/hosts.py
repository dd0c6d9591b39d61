"""Host-side agreement between the JAX processes of a data-parallel eval.

Every generate call on a mesh is a collective: all processes must make the same calls, even
when one has run out of rows (a shorter share of the split, records skipped as bad) or failed
reading them. These helpers are one small all-gather each; on one process they gather nothing.
"""

from __future__ import annotations

import json

import jax
from jax.experimental import multihost_utils
import numpy as np

_FAILED, _DONE, _BATCH = 2, 0, 1


def everyone(value) -> np.ndarray:
  """[process_count] the int `value` of every process, in process order."""
  if jax.process_count() == 1:
    return np.asarray([value])
  return np.asarray(multihost_utils.process_allgather(np.int32(value))).reshape(-1)


def lockstep(batches, blank):
  """This process's `batches`, then `blank()` (all rows invalid) until every process has run
  out, so every process makes the same number of calls. An error while reading batches on any
  process stops all of them at the same call: that process raises it, the others name it."""
  it = iter(batches)
  while True:
    batch, error = None, None
    try:
      batch = next(it, None)
    except Exception as e:  # re-raised below, once the others know
      error = e
    status = _FAILED if error is not None else _BATCH if batch is not None else _DONE
    statuses = everyone(status)
    if error is not None:
      raise error
    failed = np.flatnonzero(statuses == _FAILED).tolist()
    if failed:
      raise RuntimeError(
        f'eval: process(es) {failed} failed reading their eval batches (see their logs)'
      )
    if not (statuses == _BATCH).any():
      return
    yield blank() if batch is None else batch


def allgather_rows(table: np.ndarray) -> np.ndarray:
  """Every process's rows of an int32 [N, K] table (N the same everywhere), process after process."""
  if jax.process_count() == 1:
    return table
  return np.asarray(multihost_utils.process_allgather(np.asarray(table, np.int32), tiled=True))


def allgather_json(obj) -> list:
  """Every process's JSON-serialisable `obj`, in process order."""
  if jax.process_count() == 1:
    return [obj]
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = everyone(len(data))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[: len(data)] = data
  rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [json.loads(bytes(row[:n].astype(np.uint8))) for row, n in zip(rows, sizes)]
