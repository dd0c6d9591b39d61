"""The precomputed reference (cpo.reference='precomputed'): one pass before training.

The pass computes the adapters-off log-probs of every step's batch, stores them per process as
.npz (plain arrays, read without pickle) under <workdir>/reference/, and the step then runs no
reference forward. The stream is deterministic, so row s belongs to step s; a fingerprint of
each batch guards the pairing. The rows so far are stored every `checkpoint.every_steps`
steps, so a pass cut short (preempted, killed) resumes from there.
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
  """64-bit hash of a step's pipeline batch: checks that a precomputed reference row belongs to
  the batch it is attached to (same stream, same data, same seed). Pixel arrays are left out
  when the rows carry the digest of their images (`image_digest`, made by the pipeline)."""
  digested = 'image_digest' in batch
  h = hashlib.blake2b(digest_size=8)
  for key in sorted(batch):
    if digested and key.endswith('pixel_values'):
      continue
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
    cls,
    stage,
    trainable,
    frozen,
    *,
    mesh,
    num_steps,
    make_batches,
    prepare,
    workdir,
    save_every=100,
  ):
    """The table of `num_steps` steps: read, or computed (resuming a pass cut short: the rows
    stored every `save_every` steps are kept, their batches skipped and checked)."""
    path = paths.path(workdir) / 'reference' / f'{stage.name}.process{jax.process_index()}.npz'
    rows, fingerprints = [], []
    if path.exists():
      with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as f:
        table = cls(f['rows'], f['fingerprints'], path)
        stored = str(f['settings']) if 'settings' in f else '(not recorded)'
      if stored != stage.reference_settings:
        raise ValueError(
          f'{path}: its reference log-probs were computed with {stored}, this run needs '
          f'{stage.reference_settings}; delete the file to recompute it.'
        )
      if len(table.rows) >= num_steps:
        return table
      rows, fingerprints = list(table.rows), list(table.fingerprints)
      logging.info('%s has %d of %d steps; computing the rest.', path, len(rows), num_steps)

    @jax.jit
    def reference(trainable, frozen, batch, step):
      model = nnx.merge(stage.graphdef, trainable, frozen, copy=True)
      # The update count the train step will see (device-made pairs fold it in).
      return stage.reference_fn(model, dict(batch, step=step))

    def store():
      buf = io.BytesIO()
      stacked = np.stack(rows).astype(np.float32)
      np.savez(
        buf,
        rows=stacked,
        fingerprints=np.asarray(fingerprints, np.uint64),
        settings=np.asarray(stage.reference_settings),
      )
      paths.write_bytes_whole(path, buf.getvalue())  # whole or absent, never half-written
      return stacked

    batches, done = make_batches(), len(rows)
    for step in range(done):  # the stored rows' batches: only checked, not computed again
      if batch_fingerprint(next(batches)) != fingerprints[step]:
        raise ValueError(
          f'{path}: step {step} was computed for another batch (data, seed or batch size '
          'changed since); delete the file to recompute it.'
        )
    for step in tqdm.tqdm(
      range(done, num_steps),
      initial=done,
      total=num_steps,
      desc=f'{stage.name} reference log-probs',
      unit='step',
      dynamic_ncols=True,
      disable=jax.process_index() != 0,
    ):
      raw = next(batches)
      fingerprints.append(batch_fingerprint(raw))
      batch = prepare(raw)
      out = reference(trainable, frozen, sharding.global_batch(batch, mesh), np.int32(step))
      rows.append(sharding.process_rows(out))
      if (step + 1) % save_every == 0 and step + 1 < num_steps:
        store()  # a pass cut here (preemption, a crash) resumes from this row
    return cls(store(), np.asarray(fingerprints, np.uint64), path)

  def attach(self, batch, step, fingerprint):
    """`batch` (prepared) with its reference row; `fingerprint`: batch_fingerprint of the
    pipeline batch it was prepared from."""
    if step >= len(self.rows) or fingerprint != self.fingerprints[step]:
      raise ValueError(
        f'step {step}: the batch is not the one the precomputed reference in {self.path} '
        f'was computed for (data, seed, batch size or perturbations changed since); '
        f'delete that file to recompute it.'
      )
    return dict(batch, reference_logps=self.rows[step])
