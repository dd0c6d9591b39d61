"""The straightforward SFT and CPO++ losses: the same numbers as `objectives`, the peers' work.

Every forward encodes its images from pixel_values and projects every position to the full
vocabulary; the policy and the reference each run the whole batch. This is what TRL-style
trainers compute. It is never used to train: the tests check the default step against it
(loss, metrics, gradients), and bench/bench_step.py measures what the savings buy.
"""

import jax.numpy as jnp

from cpo_jax.train import completion
from cpo_jax.train import device_pairs
from cpo_jax.train import objectives


def naive_sft_loss_fn(model, batch, grid):
  """`objectives.sft_loss_fn` with full-vocabulary logits at every position."""
  return objectives.sft_objective(objectives.sft_logps(model, batch, grid))


def naive_cpo_loss_fn(model, batch, grid, cfg, *, perturbations=(), layout=None, seed=0):
  """`objectives.cpo_loss_fn` computed the straightforward way (no pair layout needed)."""
  policy, reference = objectives.policy_and_reference(model)
  n = batch['chosen_input_ids'].shape[0]
  k = len(perturbations)
  pixels = [batch['chosen_pixel_values'], batch['rejected_pixel_values']]
  if k:
    layout = layout or device_pairs.layout_for(policy.config)
    pixels.append(device_pairs.perturbed_pixels(batch, grid, perturbations, layout, seed=seed))
  rows = objectives.pair_rows(
    batch, k, answer_weight=cfg.answer_weight, end_token_weight=cfg.end_token_weight
  )
  forward = dict(
    pixel_values=jnp.concatenate(pixels, axis=0),
    image_grid_thw=completion.grid_rows((2 + k) * n, grid),
  )

  def logps(m):
    return objectives.pair_logps(m, rows, n, cfg, **forward)

  pol = logps(policy)
  ref_c, ref_r = objectives.reference_of(policy, reference, logps)
  return objectives.preference_objective(pol, ref_c, ref_r, batch, cfg, k)
