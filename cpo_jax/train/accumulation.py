"""Gradient accumulation: one update from k micro-batches, equal to the whole batch's.

Both stages' losses are means over the batch: SFT's over completion tokens, CPO++'s over pairs
with batch-normalised source weights plus the NLL over the chosen tokens. Their normalisers
depend on the data only, so they are computed once from the whole batch (`*_totals`), and each
micro-batch contributes its sum over those fixed normalisers: the micro-batch losses add up to
the whole batch's loss, and their gradients to its gradient. The metrics are computed once,
from every micro-batch's log-probs together, by the same objective as an unaccumulated step.

On host, `split_micro` cuts each process's rows into k contiguous chunks; a grouped pair
layout stays intact when a chunk holds whole groups. Random draws inside the step (LoRA
dropout, noisy device-made pairs) are drawn per micro-batch: equal in distribution, not bit
for bit, to the whole batch's.
"""

import functools
from typing import Callable
from typing import NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from cpo_jax import losses
from cpo_jax.train import completion
from cpo_jax.train import objectives


class Accumulation(NamedTuple):
  """How a stage's step accumulates (steps.make_train_step uses it when steps > 1)."""

  steps: int
  totals_fn: Callable  # (stacked batch) -> normalisers of the whole batch
  micro_loss_fn: Callable  # (model, micro-batch, totals) -> (loss share, log-prob rows)
  finish_fn: Callable  # (stacked rows, stacked batch) -> (loss, metrics) of the whole batch
  group: int = 1  # rows a micro-batch keeps together (the pair layout's group)


def batch_rows(batch):
  """Rows (sequences, or pairs) of an SFT or CPO batch."""
  key = 'input_ids' if 'input_ids' in batch else 'chosen_input_ids'
  return batch[key].shape[0]


def micro_shape(shape, steps):
  """[B, ...] -> [steps, B / steps, ...]; for pixel_values [B * P, D] that is also by row."""
  return (steps, shape[0] // steps, *shape[1:])


def steps_for_mesh(rows, rows_per_device, mesh, group=1):
  """grad_accum_steps=0: the fewest micro-batches with at most `rows_per_device` rows per
  data-parallel device that split the batch evenly over those devices and keep whole pair
  groups of `group` on each host. When no such split exists because a group needs more rows
  than that, the smallest micro-batches that hold whole groups (with a warning)."""
  parts = mesh.shape['data'] * mesh.shape['fsdp']
  hosts = jax.process_count()
  fits = [
    s
    for s in range(1, rows + 1)
    if rows % s == 0 and (rows // s) % parts == 0 and (rows // s // hosts) % group == 0
  ]
  small = [s for s in fits if rows // s // parts <= rows_per_device]
  if small:
    return small[0]
  if not fits:
    raise ValueError(
      f'a batch of {rows} rows does not split over the {parts} data-parallel devices (mesh '
      f'data x fsdp)'
      + (f' in micro-batches of whole pair groups of {group} per host' if group > 1 else '')
      + '; change batch_size or the mesh (e.g. a larger mesh.shape.tensor).'
    )
  logging.warning(
    'micro-batches of %d rows per data-parallel device (micro_batch_per_device=%d) to keep '
    'whole pair groups of %d together (data.pair_layout).',
    rows // fits[-1] // parts,
    rows_per_device,
    group,
  )
  return fits[-1]


def check_micro_rows(rows, steps, mesh):
  """`rows` (the global batch) in `steps` micro-batches must split over the data-parallel
  devices, or jit fails deep in XLA: an error that says which settings to change."""
  parts = mesh.shape['data'] * mesh.shape['fsdp']
  if rows % steps or (rows // steps) % parts:
    raise ValueError(
      f'a batch of {rows} rows in {steps} micro-batches (grad_accum_steps) does not split over '
      f'the {parts} data-parallel devices (mesh data x fsdp): batch_size / grad_accum_steps '
      f'must be a multiple of {parts}.'
    )


def split_micro(batch, steps, group=1):
  """Host: micro-batch m is the m-th contiguous chunk of this process's rows."""
  n = batch_rows(batch)
  if n % steps or (n // steps) % group:
    raise ValueError(
      f'a batch of {n} rows per process does not split into {steps} micro-batches '
      f'(grad_accum_steps) of whole pair groups of {group}; choose a batch size that does.'
    )
  return {key: np.reshape(v, micro_shape(np.shape(v), steps)) for key, v in batch.items()}


def _flat(x):
  return x.reshape(-1, *x.shape[2:])


# ---------------------------------------------------------------------------------------- SFT


def sft_totals(batch):
  return {'tokens': jnp.maximum(jnp.sum(batch['loss_mask'][..., 1:]), 1).astype(jnp.float32)}


def sft_micro_loss(model, batch, totals, *, grid, max_completion_len=0):
  length = batch['input_ids'].shape[1]
  positions = completion.completion_positions(length, grid, model, max_completion_len)
  out = objectives.sft_logps(model, batch, grid, positions)
  loss, _ = completion.guard_dropped(-jnp.sum(out.total) / totals['tokens'], out.dropped)
  return loss, out


def sft_finish(rows, batch):
  del batch
  return objectives.sft_objective(jax.tree.map(_flat, rows))


def sft_accumulation(steps, *, grid, max_completion_len=0):
  micro = functools.partial(sft_micro_loss, grid=grid, max_completion_len=max_completion_len)
  return Accumulation(steps, sft_totals, micro, sft_finish)


# -------------------------------------------------------------------------------------- CPO++


def cpo_totals(batch, *, cfg, k=0):
  """The whole batch's pair-weight normaliser and chosen-token count (METHOD.md section 3)."""
  flat = {'source': _flat(batch['source']), 'sample_weight': _flat(batch['sample_weight'])}
  source, sample_weight = objectives.pair_sources(flat, k)
  w = losses.cpo_plus_weights(source, sample_weight, tuple(cfg.source_weights), normalize=False)
  total = jnp.sum(w)
  # Normalised weights w / mean(w) make the loss sum(w l) / sum(w); unnormalised, sum(w l) / N.
  pair_weight = jnp.where(cfg.normalize_weights & (total > 0), total, source.shape[0])
  tokens = jnp.maximum(jnp.sum(batch['chosen_loss_mask'][..., 1:]), 1)
  return {'pair_weight': pair_weight.astype(jnp.float32), 'tokens': tokens.astype(jnp.float32)}


def cpo_micro_loss(model, batch, totals, *, grid, cfg, **kw):
  pol, ref_c, ref_r, k = objectives.policy_and_reference_logps(model, batch, grid, cfg, **kw)
  per_example, _, _, _, source, sample_weight = objectives.pair_losses(
    pol, ref_c, ref_r, batch, cfg, k
  )
  w = losses.cpo_plus_weights(source, sample_weight, tuple(cfg.source_weights), normalize=False)
  pref = jnp.sum(w.astype(per_example.dtype) * per_example) / totals['pair_weight']
  nll = -jnp.sum(pol.chosen_total) / totals['tokens']
  loss, _ = completion.guard_dropped(pref + cfg.rpo_alpha * nll, pol.dropped)
  return loss, (pol, ref_c, ref_r)


def cpo_finish(rows, batch, *, cfg, k=0):
  pol, ref_c, ref_r = rows
  steps, n = pol.chosen.shape

  def blocks(x):  # [steps, (1 + k) n] -> the whole batch's [(1 + k) N], block by block
    return x.reshape(steps, 1 + k, n).transpose(1, 0, 2).reshape(-1)

  whole = objectives.PairLogps(
    _flat(pol.chosen),
    blocks(pol.rejected),
    _flat(pol.chosen_total),
    _flat(pol.chosen_count),
    _flat(pol.dropped),
  )
  flat = {'source': _flat(batch['source']), 'sample_weight': _flat(batch['sample_weight'])}
  return objectives.preference_objective(whole, _flat(ref_c), blocks(ref_r), flat, cfg, k)


def cpo_accumulation(steps, *, grid, cfg, **kw):
  k = len(kw.get('perturbations', ()))
  return Accumulation(
    steps,
    functools.partial(cpo_totals, cfg=cfg, k=k),
    functools.partial(cpo_micro_loss, grid=grid, cfg=cfg, **kw),
    functools.partial(cpo_finish, cfg=cfg, k=k),
    group=(kw.get('pair_layout') or (0, 1))[1],
  )
