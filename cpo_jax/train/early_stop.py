"""An SFT stage that stops before memorising: the loss on held-out scenes picks its params.

With `sft.early_stop='val_loss'` the stage loop measures, every `sft.val_every_steps` steps and
at its last one, the SFT loss (token-mean NLL of the completions) on fixed validation batches:
scenes of the train distribution that the stage never trains on (nor the test or ood splits).
The params of the lowest loss are kept in checkpoints/<stage>_val_best/, and after
`sft.patience` measurements in a row without a lower loss the stage stops (0: it runs all its
steps). Either way the stage hands on the kept params, so the CPO++ stage (and an ablation arm
restoring the SFT model) starts from them. The measurements go to metrics.jsonl (`val/loss`)
and, with the stop, to checkpoints/<stage>_val.json, which a resumed run reads back.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable
from typing import Iterable

from absl import logging
from flax import nnx
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from cpo_jax import paths
from cpo_jax import sharding

MODES = ('', 'val_loss')


@dataclasses.dataclass(frozen=True)
class Validation:
  """When to measure the held-out loss and when to give up on it."""

  every: int  # steps between measurements (also measured at the stage's last step)
  patience: int  # measurements in a row without a lower loss before stopping; 0 = never
  batches: Callable[[], Iterable[dict]]  # step inputs (host numpy), the same ones every call

  def __post_init__(self):
    if self.every < 1 or self.patience < 0:
      raise ValueError(
        f'sft.val_every_steps={self.every} must be >= 1 and sft.patience={self.patience} >= 0.'
      )


@dataclasses.dataclass
class Tracker:
  """Pure bookkeeping over (step, loss) measurements: the best step is the first one with the
  lowest loss; `stalled` counts the measurements since it."""

  patience: int
  history: list = dataclasses.field(default_factory=list)  # [(step, loss)] in step order

  def record(self, step: int, loss: float) -> bool:
    """Adds a measurement; True when it is the new best."""
    if self.history and step <= self.history[-1][0]:
      raise ValueError(f'validation at step {step} after step {self.history[-1][0]}')
    if not np.isfinite(loss):
      raise FloatingPointError(f'the validation loss at step {step} is {loss}')
    improved = not self.history or loss < self.best_loss
    self.history.append((int(step), float(loss)))
    return improved

  @property
  def best_step(self):
    return min(self.history, key=lambda h: h[1])[0] if self.history else None

  @property
  def best_loss(self):
    return min(h[1] for h in self.history) if self.history else None

  @property
  def stalled(self) -> int:
    return sum(1 for s, _ in self.history if s > self.best_step) if self.history else 0

  @property
  def should_stop(self) -> bool:
    return self.patience > 0 and self.stalled >= self.patience


def record_file(workdir, stage_name):
  return paths.path(workdir) / 'checkpoints' / f'{stage_name}_val.json'


def best_dir(workdir, stage_name):
  return paths.path(workdir) / 'checkpoints' / f'{stage_name}_val_best'


def read_record(workdir, stage_name) -> dict:
  """{'history': [[step, loss]...], 'best_step', 'stopped_at'} of the stage, or {} (none yet)."""
  f = record_file(workdir, stage_name)
  return json.loads(f.read_text()) if f.exists() else {}


def stopped_at(workdir, stage_name):
  """The step where the stage stopped early, or None."""
  return read_record(workdir, stage_name).get('stopped_at')


def finished(workdir, stage_name, num_steps, latest):
  """Whether a stage whose latest checkpoint is `latest` is done: all its steps, or stopped
  early there."""
  return latest is not None and (latest >= num_steps or stopped_at(workdir, stage_name) == latest)


def _manager(workdir, stage_name, read_only=False):
  return ocp.CheckpointManager(
    best_dir(workdir, stage_name),
    options=ocp.CheckpointManagerOptions(
      max_to_keep=1, best_fn=lambda m: m['val/loss'], best_mode='min', read_only=read_only
    ),
  )


def restore_best(workdir, stage_name, like):
  """The params of the stage's lowest validation loss, in the shardings of `like`."""
  path = best_dir(workdir, stage_name)
  if not (path.is_dir() and any(p.name.isdigit() for p in path.iterdir())):
    raise FileNotFoundError(
      f"sft.early_stop='val_loss': no validated params of stage {stage_name!r} under {path}; "
      'was that stage trained with early stopping? Train it so, or set sft.early_stop="".'
    )
  manager = _manager(workdir, stage_name, read_only=True)
  try:
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return manager.restore(manager.best_step(), args=ocp.args.StandardRestore(target))
  finally:
    manager.close()


def make_loss_fn(stage, mesh, state_shardings):
  """A jitted (trainable, frozen, batch) -> the stage's loss on the batch (no update)."""
  graphdef, loss_fn = stage.graphdef, stage.loss_fn

  def loss(trainable, frozen, batch):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return loss_fn(nnx.merge(graphdef, trainable, frozen, copy=True), batch)[0]

  trainable_sh, frozen_sh = state_shardings
  return jax.jit(
    loss,
    in_shardings=(trainable_sh, frozen_sh, sharding.batch_sharding(mesh)),
    out_shardings=sharding.replicated(mesh),
  )


def held_out_loss(loss_fn, trainable, frozen, batches, mesh) -> float:
  """Token-mean completion NLL over all `batches`: each batch's mean weighted by its tokens."""
  total, tokens = 0.0, 0
  for batch in batches:
    n = int(np.asarray(batch['loss_mask'])[:, 1:].sum())  # what the loss averages over
    if jax.process_count() > 1:  # each host holds its own rows
      n = int(np.sum(multihost_utils.process_allgather(np.int64(n))))
    loss = float(loss_fn(trainable, frozen, sharding.global_batch(batch, mesh)))
    total, tokens = total + loss * n, tokens + n
  if not tokens:
    raise ValueError('the validation batches hold no completion token (sft.val_examples?)')
  return total / tokens


class Monitor:
  """The loop's side of early stopping: measures, logs, keeps the best params, remembers."""

  def __init__(self, validation, stage, mesh, state_shardings, workdir, writer, start):
    self.validation, self.stage_name, self.mesh = validation, stage.name, mesh
    self.workdir, self.writer = workdir, writer
    self.loss_fn = make_loss_fn(stage, mesh, state_shardings)
    # Resuming: the measurements up to the checkpoint resumed from (the loop checkpoints at
    # every measurement, so normally all of them); those after it are made again.
    done = [(s, v) for s, v in read_record(workdir, stage.name).get('history', []) if s <= start]
    self.tracker = Tracker(validation.patience, [tuple(h) for h in done])
    self.manager = _manager(workdir, stage.name)
    for step in self.manager.all_steps():
      if step > start:
        self.manager.delete(step)
    if self.tracker.history and self.tracker.best_step not in self.manager.all_steps():
      logging.warning(
        '%s: the params of the best validated step %d are gone; validation starts over at step %d.',
        stage.name,
        self.tracker.best_step,
        start,
      )
      self.tracker.history.clear()

  def due(self, done, num_steps):
    return done % self.validation.every == 0 or done == num_steps

  def measure(self, done, trainable, frozen) -> bool:
    """Measures at step `done`; True when the stage should stop there."""
    loss = held_out_loss(self.loss_fn, trainable, frozen, self.validation.batches(), self.mesh)
    improved = self.tracker.record(done, loss)
    if improved:
      self.manager.save(done, args=ocp.args.StandardSave(trainable), metrics={'val/loss': loss})
    self.writer.write(
      {
        'stage': self.stage_name,
        'step': done,
        'val/loss': loss,
        'val/best_step': self.tracker.best_step,
      }
    )
    self._write_record(None)
    return self.tracker.should_stop

  def mark_stopped(self, step):
    self._write_record(step)

  def _write_record(self, stopped):
    if jax.process_index() == 0:
      paths.write_json(
        record_file(self.workdir, self.stage_name),
        {
          'history': self.tracker.history,
          'best_step': self.tracker.best_step,
          'best_loss': self.tracker.best_loss,
          'patience': self.tracker.patience,
          'stopped_at': stopped,
        },
        indent=1,
      )

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
