"""The precomputed reference (cpo.reference='precomputed'): one pass before training.

The pass computes the adapters-off log-probs of every step's batch, stores them per process as
.npz (plain arrays, read without pickle) under <workdir>/reference/, and the step then runs no
reference forward. The stream is deterministic, so row s belongs to step s; a fingerprint of
each batch guards the pairing.
"""

import hashlib
import io

from absl import logging
from flax import nnx
import jax
import numpy as np
import tqdm

from cpo_jax import paths
from cpo_jax import sharding


def batch_fingerprint(batch):
  """64-bit hash of a step's input arrays: checks that a precomputed reference row belongs
  to the batch it is attached to (same stream, same data, same seed)."""
  h = hashlib.blake2b(digest_size=8)
  for key in sorted(batch):
    h.update(key.encode())
    h.update(np.ascontiguousarray(batch[key]).tobytes())
  return np.uint64(int.from_bytes(h.digest(), 'little'))


class ReferenceTable:
  """Reference log-probs of every step's batch, computed once before training.

  The stream is deterministic (a resumed run sees exactly the batches an uninterrupted one
  would), so row s belongs to step s; a fingerprint of the batch guards the pairing and a
  mismatch is an error, never a silent wrong reference. Stored per process as .npz (plain
  arrays, loaded without pickle) under <workdir>/reference/.
  """

  def __init__(self, rows, fingerprints, path):
    self.rows, self.fingerprints, self.path = rows, fingerprints, path

  @classmethod
  def load_or_compute(
    cls, stage, trainable, frozen, *, mesh, num_steps, make_batches, prepare, workdir
  ):
    path = paths.path(workdir) / 'reference' / f'{stage.name}.process{jax.process_index()}.npz'
    if path.exists():
      with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as f:
        table = cls(f['rows'], f['fingerprints'], path)
      if len(table.rows) >= num_steps:
        return table
      logging.info('%s has %d of %d steps; recomputing.', path, len(table.rows), num_steps)

    @jax.jit
    def reference(trainable, frozen, batch, step):
      model = nnx.merge(stage.graphdef, trainable, frozen, copy=True)
      # The update count the train step will see (device-made pairs fold it in).
      return stage.reference_fn(model, dict(batch, step=step))

    batches, rows, fingerprints = make_batches(), [], []
    for step in tqdm.tqdm(
      range(num_steps),
      desc=f'{stage.name} reference log-probs',
      unit='step',
      dynamic_ncols=True,
      disable=jax.process_index() != 0,
    ):
      batch = prepare(next(batches))
      fingerprints.append(batch_fingerprint(batch))
      out = reference(trainable, frozen, sharding.global_batch(batch, mesh), np.int32(step))
      rows.append(sharding.process_rows(out))
    table = cls(np.stack(rows).astype(np.float32), np.asarray(fingerprints, np.uint64), path)
    buf = io.BytesIO()
    np.savez(buf, rows=table.rows, fingerprints=table.fingerprints)
    paths.write_bytes_whole(path, buf.getvalue())  # whole or absent: a preempted pass reruns
    return table

  def attach(self, batch, step):
    if step >= len(self.rows) or batch_fingerprint(batch) != self.fingerprints[step]:
      raise ValueError(
        f'step {step}: the batch is not the one the precomputed reference in {self.path} '
        f'was computed for (data, seed, batch size or perturbations changed since); '
        f'delete that file to recompute it.'
      )
    return dict(batch, reference_logps=self.rows[step])
