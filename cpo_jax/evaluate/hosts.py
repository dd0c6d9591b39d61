"""Host-side agreement between the JAX processes of a data-parallel eval.

Every generate call and every teacher-forced forward on a mesh is a collective: all processes
must make the same calls with the same shapes, even when one has run out of rows (a shorter
share of the split, records skipped as bad) or failed reading them. These helpers are one small
all-gather each; on one process they gather nothing. A probe that reads only its share gives
per-row results keyed by record index; `rows_by_index` gathers them in record order, each
record once, as one process reading the whole split would have them.
"""

from __future__ import annotations

import json

import jax
from jax.experimental import multihost_utils
import numpy as np

from cpo_jax import generate as generate_lib

_FAILED, _DONE, _BATCH = 2, 0, 1


def everyone(value) -> np.ndarray:
  """[process_count] the int `value` of every process, in process order."""
  return everyones([value])[:, 0]


def everyones(values) -> np.ndarray:
  """[process_count, K] the K ints `values` of every process, in process order."""
  values = np.asarray(values, np.int32).reshape(-1)
  if jax.process_count() == 1:
    return values[None]
  gathered = multihost_utils.process_allgather(values)
  return np.asarray(gathered).reshape(jax.process_count(), len(values))


def agreed_max(values) -> list[int]:
  """The largest of each of the K ints over the processes (a padded length all must use)."""
  return everyones(values).max(0).tolist()


def any_process(flags) -> np.ndarray:
  """[K] bool: the flag is set on some process (a call all must make if one needs it)."""
  return everyones(np.asarray(flags, bool).astype(np.int32)).any(0)


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


def share(model) -> dict:
  """{shard_index, shard_count}: the share of a split this process reads in a data-parallel
  eval of `model` (its row group, generate.row_groups; (0, 1) off a mesh)."""
  groups = generate_lib.row_groups(generate_lib.mesh_of(model))
  return {'shard_index': groups.index, 'shard_count': groups.count}


def rows_by_index(rows: list[dict], gather: bool) -> list[dict]:
  """Per-row results (JSON objects with an int 'index', the record's place in the split) in
  record order, each record once (processes of one row group hold the same rows). With
  `gather`, every process's rows, from all of them; else this process's."""
  if gather:
    rows = [r for part in allgather_json(rows) for r in part]
  return list({r['index']: r for r in sorted(rows, key=lambda r: r['index'])}.values())


def probe_blank(blank: dict, num_concepts: int) -> dict:
  """An eval blank batch (every row invalid) with what the probes read from a row: gold
  concept ids (each concept's first value; never scored) and empty evidence boxes."""
  b = len(blank['valid'])
  return dict(
    blank,
    concepts=np.zeros((b, num_concepts), np.int32),
    nuisance=np.full(b, -1, np.int32),
    boxes=np.zeros((b, 1, 4), np.int32),
  )
