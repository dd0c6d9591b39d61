"""Throughput of a stage as a run logs it: step time, tokens and rows per second, and MFU.

Step time is wall time between two logged steps divided by the steps between them (host work
included: what the run actually sustains); the first interval after a (re)start holds the
compilation and reports nothing. MFU is an estimate by formula, LLM matmuls only (the ViT and
attention scores are left out, so it is a lower bound): 2 x N x tokens per forward pass, where
N counts the LLM's matmul weights and tokens are the batch's non-padding tokens; a step is 3
passes when the base weights train, 2 with LoRA (the backward computes activation gradients
only), plus 1 for an in-step reference forward. Peak FLOP/s per chip (bf16, dense) comes from
the device kind; on a CPU there is no MFU.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from cpo_jax.train import accumulation

# Dense bf16 peak FLOP/s per chip, by a substring of jax.Device.device_kind.
PEAK_FLOPS = (
  ('v6 lite', 918e12),
  ('v6e', 918e12),
  ('v5p', 459e12),
  ('v5 lite', 197e12),
  ('v5e', 197e12),
  ('v4', 275e12),
  ('H200', 989e12),
  ('H100', 989e12),
  ('A100', 312e12),
)


def peak_flops(device) -> float | None:
  kind = getattr(device, 'device_kind', '')
  return next((peak for key, peak in PEAK_FLOPS if key.lower() in kind.lower()), None)


def _names(path):
  return [str(getattr(k, 'key', k)) for k in path]


def llm_matmul_params(*states) -> int:
  """Weights of the LLM's matmuls: its kernels (no vision tower, no adapters) and the
  vocabulary projection (the embedding itself when tied)."""
  n, head, embedding = 0, False, 0
  for state in states:
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
      names = _names(path)
      if 'visual' in names or any('lora' in s for s in names):
        continue
      head = head or 'lm_head' in names
      if 'embed_tokens' in names:
        embedding = int(np.prod(np.shape(leaf)))
      elif 'kernel' in names:
        n += int(np.prod(np.shape(leaf)))
  return n + (0 if head else embedding)


def passes_per_step(stage) -> int:
  base_trains = any(
    not any('lora' in s for s in _names(path))
    for path, _ in jax.tree_util.tree_leaves_with_path(stage.trainable)
  )
  in_step_reference = stage.name != 'sft' and stage.reference_fn is None
  return (3 if base_trains else 2) + int(in_step_reference)


def batch_tokens(batch) -> int:
  """Non-padding tokens of this host's batch (both sides of a pair)."""
  return int(sum(np.asarray(v).sum() for k, v in batch.items() if k.endswith('attention_mask')))


class Meter:
  """Accumulates tokens and rows between logged steps; `report()` gives the perf/ metrics."""

  def __init__(self, stage, mesh):
    self.flops_per_token = 2 * llm_matmul_params(stage.trainable, stage.frozen)
    self.flops_per_token *= passes_per_step(stage)
    peak = peak_flops(mesh.devices.flat[0])
    self.peak = None if peak is None else peak * mesh.devices.size
    self.unit = 'rows' if stage.name == 'sft' else 'pairs'
    self._since, self._steps, self._tokens, self._rows = None, 0, 0, 0

  def add(self, host_batch):
    self._steps += 1
    self._tokens += batch_tokens(host_batch) * jax.process_count()
    self._rows += accumulation.batch_rows(host_batch) * jax.process_count()

  def restart(self):
    """Starts a new interval now (after work that is not training, e.g. an evaluation)."""
    self._since, self._steps, self._tokens, self._rows = time.perf_counter(), 0, 0, 0

  def report(self) -> dict[str, float]:
    """At a logged step (its metrics fetched, so the step has finished)."""
    now, since = time.perf_counter(), self._since
    steps, tokens, rows = self._steps, self._tokens, self._rows
    self._since, self._steps, self._tokens, self._rows = now, 0, 0, 0
    if since is None or not steps:  # the first interval holds the compilation
      return {}
    seconds = now - since
    out = {
      'perf/step_s': seconds / steps,
      'perf/tokens_per_s': tokens / seconds,
      f'perf/{self.unit}_per_s': rows / seconds,
    }
    if self.peak:
      out['perf/mfu'] = self.flops_per_token * tokens / seconds / self.peak
    return out
