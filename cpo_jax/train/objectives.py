"""The loss functions of the two stages: SFT cross-entropy and the CPO++ objective.

Each is a pure function (model, batch) -> (loss, metrics) that the jitted step differentiates.
The CPO++ step does less work than a peer's for the same numbers (DESIGN.md, "Where the time
goes"): chosen and rejected rows go through one concatenated forward; when the vision tower
carries no adapters the images are encoded once per step and shared by policy and reference
(a thinking pair's image once for both sides, with a grouped pair layout); the vocabulary
projection runs at completion positions only. `naive.py` computes the same numbers the
straightforward way, as the yardstick of the tests and the benchmark.
"""

from typing import NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp

from cpo_jax import losses
from cpo_jax.models import lora
from cpo_jax.train import completion
from cpo_jax.train import device_pairs
from cpo_jax.train import pair_images
from cpo_jax.train import shared_prefix

# The reference policy: the SFT model as the adapters-off policy (one model in memory), a
# separate frozen copy, or its log-probs computed once over the stream before training and
# streamed with each batch (no reference forward in the step; see `reference_table.py`).
REFERENCE_MODES = ('adapters_off', 'frozen_copy', 'precomputed')


class PolicyAndReference(nnx.Module):
  """cpo.reference='frozen_copy': the policy beside a separate frozen copy of the SFT model.

  The copy's Params are not LoRAParams, so `split_model(..., 'lora')` puts them in the frozen
  state: they travel to the step as (sharded) arguments, never as baked-in constants."""

  def __init__(self, policy, reference):
    self.policy = policy
    self.reference = reference


def policy_and_reference(model):
  """(policy, separate reference model or None: the reference is the adapters-off policy)."""
  if isinstance(model, PolicyAndReference):
    return model.policy, model.reference
  return model, None


def vision_has_adapters(model):
  """True when LoRA adapters live in the vision tower (then policy and reference images differ)."""
  return bool(jax.tree.leaves(nnx.state(model.visual, lora.LoRAParam)))


def sft_loss_fn(model, batch, grid, *, max_completion_len=0):
  """Stage 1: the mean cross-entropy of the completion tokens (chain, answer, <|im_end|>)."""
  length = batch['input_ids'].shape[1]
  positions = completion.completion_positions(length, grid, model, max_completion_len)
  return sft_objective(sft_logps(model, batch, grid, positions))


def sft_logps(model, batch, grid, num_positions=None):
  """`CompletionLogps` of an SFT batch (num_positions=None: every position projected)."""
  return completion.completion_logps(
    model,
    batch['input_ids'],
    batch['attention_mask'],
    batch['loss_mask'],
    batch['position_ids'],
    pixel_values=batch['pixel_values'],
    image_grid_thw=completion.grid_rows(batch['input_ids'].shape[0], grid),
    num_positions=num_positions,
  )


def sft_objective(out):
  """(loss, metrics) of the SFT stage from the batch's `CompletionLogps`."""
  loss, n_dropped = completion.guard_dropped(
    completion.token_mean_nll(out.total, out.count), out.dropped
  )
  return loss, {'loss': loss, 'completion_tokens_dropped': n_dropped}


class PairLogps(NamedTuple):
  """One model's log-probs over the rows of a CPO batch (n pairs, k device-made blocks)."""

  chosen: jax.Array  # [n] as the loss uses them (sums; means for ipo)
  rejected: jax.Array  # [(1 + k) n]: the batch's rejected sides, then the device-made ones
  chosen_total: jax.Array  # [n] summed log-probs of the chosen completions (the NLL term)
  chosen_count: jax.Array  # [n] completion tokens per chosen row
  dropped: jax.Array  # [2n] completion tokens beyond the static slab (must be 0)


PAIR_ROW_KEYS = ('input_ids', 'attention_mask', 'loss_mask', 'position_ids')
# The weight of the answer tokens (after '</think>') in the preference's log-probs
# (cpo.answer_weight): 1 sums the whole completion (the paper's DPO, TRL's); 0 the chain only,
# the answer tokens left to the NLL term, so the answer that follows a rejected chain is not
# pushed down for following it. The batch says where each side's answer starts.
ANSWER_START_KEYS = ('chosen_answer_start', 'rejected_answer_start')
# The closing end token (<|im_end|>, the last completion token) weighs answer_weight *
# cpo.end_token_weight: at 0 the preference compares what the sides say, not where they stop
# (pushing down the rejected side's end teaches the model not to stop after an answer like
# it); the NLL term keeps it.


def _check_weight(name, weight):
  if not 0.0 <= weight <= 1.0:
    raise ValueError(f'config.cpo.{name}={weight!r}; expected a number in [0, 1].')
  return weight != 1.0


def weighs_answers(answer_weight):
  """True when the step needs the answer tokens marked (a weight other than 1); checks it."""
  return _check_weight('answer_weight', answer_weight)


def weighs_end(end_token_weight):
  """True when the step needs the end token marked (a weight other than 1); checks it."""
  return _check_weight('end_token_weight', end_token_weight)


def mark_answer_tokens(loss_mask, answer_start):
  """loss_mask [B, L] with its completion tokens at positions >= answer_start [B] set to
  `completion.ANSWER_TOKEN`."""
  after = jnp.arange(loss_mask.shape[1])[None, :] >= answer_start[:, None]
  return jnp.where((loss_mask > 0) & after, completion.ANSWER_TOKEN, loss_mask)


def mark_end_token(loss_mask):
  """loss_mask [B, L] with each row's last completion token set to `completion.END_TOKEN`."""
  positions = jnp.arange(loss_mask.shape[1])[None, :]
  last = jnp.max(jnp.where(loss_mask > 0, positions, -1), axis=1, keepdims=True)
  return jnp.where(positions == last, completion.END_TOKEN, loss_mask)


def pair_rows(batch, k=0, key_names=PAIR_ROW_KEYS, answer_weight=1.0, end_token_weight=1.0):
  """The token rows of a CPO batch as one concatenated forward sees them: chosen [n], rejected
  [n], then k blocks of the chosen rows (the device-made pairs' rejected sides carry the chosen
  chain over a perturbed chosen image). Weights other than 1 mark the answer tokens of the
  loss_mask (`mark_answer_tokens`, from the batch's `ANSWER_START_KEYS`) and its end token."""
  answers, end = weighs_answers(answer_weight), weighs_end(end_token_weight)
  rows = {}
  for key in key_names:
    chosen, rejected = batch['chosen_' + key], batch['rejected_' + key]
    if key == 'loss_mask' and answers:
      chosen = mark_answer_tokens(chosen, batch['chosen_answer_start'])
      rejected = mark_answer_tokens(rejected, batch['rejected_answer_start'])
    if key == 'loss_mask' and (answers or end):
      chosen, rejected = mark_end_token(chosen), mark_end_token(rejected)
    rows[key] = jnp.concatenate([chosen, rejected] + [chosen] * k, axis=0)
  return rows


def pair_logps(model, rows, n, cfg, **forward):
  """`PairLogps` of `model` over the concatenated `rows` (see `pair_rows`); `forward` says how
  images arrive (pixel_values + image_grid_thw, or image_embeds) and the slab (num_positions)."""
  return pair_logps_of(completion.completion_logps(model, **rows, **forward), n, cfg)


def preference_logps(out, answer_weight, end_token_weight=1.0):
  """(sum, mean) per row of the log-probs the preference compares: the answer tokens' part of
  the sum weighted by answer_weight, the end token's by answer_weight * end_token_weight (their
  share of the count too)."""
  if answer_weight == 1.0 and end_token_weight == 1.0:
    return out.total, out.mean
  end_weight = answer_weight * end_token_weight
  total = out.total - (1.0 - answer_weight) * out.answer_total - (1.0 - end_weight) * out.end_total
  count = out.count - (1.0 - answer_weight) * out.answer_count - (1.0 - end_weight) * out.end_count
  return total, total / jnp.maximum(count, 1.0).astype(total.dtype)


def pair_logps_of(out, n, cfg):
  """`PairLogps` from the `CompletionLogps` of the concatenated pair rows (cfg: config.cpo)."""
  # ipo: the mean; else the sum. The NLL term keeps the whole chosen completion.
  preferred = preference_logps(out, cfg.answer_weight, cfg.end_token_weight)
  used = losses.logps_for_loss(*preferred, cfg.loss_type)
  # The device-made rows copy chosen rows' tokens: only the first 2n can drop tokens of their own.
  return PairLogps(used[:n], used[n:], out.total[:n], out.count[:n], out.dropped[: 2 * n])


def reference_of(policy, reference, logps):
  """The reference's (chosen, rejected) log-probs: the adapters-off policy or the copy.
  `logps(model)` -> PairLogps."""
  if reference is None:
    with lora.adapters_disabled(policy):
      out = logps(policy)
  else:
    out = logps(reference)
  return jax.lax.stop_gradient(out.chosen), jax.lax.stop_gradient(out.rejected)


def pair_sources(batch, k=0):
  """(source, sample_weight) of all (1 + k) n pairs: device-made pairs are 'perception' pairs
  of weight 1."""
  source, sample_weight = batch['source'], batch['sample_weight']
  if not k:
    return source, sample_weight
  n = source.shape[0]
  source = jnp.concatenate(
    [source, jnp.full((k * n,), device_pairs.PERTURBED_SOURCE, source.dtype)]
  )
  return source, jnp.concatenate([sample_weight, jnp.ones((k * n,), sample_weight.dtype)])


def pair_losses(policy, ref_chosen, ref_rejected, batch, cfg, k=0):
  """Per-pair preference losses of all (1 + k) n pairs and TRL's metrics, with the chosen
  log-probs as paired (a device-made pair's chosen side is its row's) and `pair_sources`."""
  pol_c, ref_c = jnp.tile(policy.chosen, 1 + k), jnp.tile(ref_chosen, 1 + k)
  per_example, metrics = losses.preference_loss(
    pol_c,
    policy.rejected,
    ref_c,
    ref_rejected,
    beta=cfg.beta,
    loss_type=cfg.loss_type,
    label_smoothing=cfg.label_smoothing,
  )
  return per_example, metrics, pol_c, ref_c, *pair_sources(batch, k)


def preference_objective(policy, ref_chosen, ref_rejected, batch, cfg, k=0):
  """CPO++ (METHOD.md section 3) from log-probs: weighted preference loss + rpo_alpha * NLL.

  `policy` is the policy's PairLogps; ref_* the reference's log-probs of the same rows. With k
  device-made blocks, each extra pair's chosen side is its batch row's chosen side."""
  n = policy.chosen.shape[0]
  pol_r = policy.rejected
  per_example, metrics, pol_c, ref_c, source, sample_weight = pair_losses(
    policy, ref_chosen, ref_rejected, batch, cfg, k
  )
  pref = losses.cpo_plus_loss(
    per_example,
    source,
    sample_weight,
    source_weights=tuple(cfg.source_weights),
    normalize=cfg.normalize_weights,
  )
  nll = completion.token_mean_nll(policy.chosen_total, policy.chosen_count)
  loss, n_dropped = completion.guard_dropped(pref + cfg.rpo_alpha * nll, policy.dropped)
  metrics.update(loss=loss, preference_loss=pref, nll=nll, completion_tokens_dropped=n_dropped)
  per_pair = losses.pair_metrics(pol_c, pol_r, ref_c, ref_rejected, beta=cfg.beta)
  metrics.update(losses.per_source_metrics(per_pair, source))
  if k:
    extra_pairs = {key: v[n:] for key, v in per_pair.items()}
    extra_pairs['loss'] = per_example[n:]
    metrics.update(
      losses.per_source_metrics(
        extra_pairs, jnp.zeros((k * n,), jnp.int32), names=(device_pairs.PERTURBED_PREFIX,)
      )
    )
  return loss, metrics


def step_logps(
  model,
  batch,
  grid,
  cfg,
  *,
  max_completion_len=0,
  max_prompt_len=0,
  shared_prefix_step=True,
  perturbations=(),
  layout=None,
  seed=0,
  pair_layout=None,
  vision_score_bytes=None,
):
  """(policy, reference or None, k, logps(model) -> PairLogps) of the default CPO++ step.

  With a pair layout holding thinking pairs, those pairs run their image and prompt once
  (`shared_prefix`) unless shared_prefix_step=False or it would not save LLM tokens.
  vision_score_bytes: the vision attention's block size (`stages.vision_score_bytes`)."""
  policy, reference = policy_and_reference(model)
  n, length = batch['chosen_input_ids'].shape
  k = len(perturbations)
  extra = None
  if k:
    layout = layout or device_pairs.layout_for(policy.config)
    extra = device_pairs.perturbed_pixels(batch, grid, perturbations, layout, seed=seed)
  rows = pair_rows(batch, k, answer_weight=cfg.answer_weight, end_token_weight=cfg.end_token_weight)
  positions = completion.completion_positions(length, grid, policy, max_completion_len)

  sizes = shared_prefix.prefix_sizes(
    length, positions, max_prompt_len, pair_layout, shared_prefix_step
  )

  def embeds(m):
    return pair_images.pair_image_embeds(m, batch, grid, pair_layout, extra, vision_score_bytes)

  def logps_with(m, image_embeds):
    if sizes is None:
      return pair_logps(m, rows, n, cfg, image_embeds=image_embeds, num_positions=positions)
    out = shared_prefix.pair_completion_logps(
      m, rows, n, image_embeds, pair_layout, sizes, positions
    )
    return pair_logps_of(out, n, cfg)

  if vision_has_adapters(policy):
    # Each model encodes with its own (adapted or adapters-off) vision tower.
    def logps(m):
      return logps_with(m, embeds(m))
  else:
    # A frozen ViT without adapters: identical embeddings for both models, no gradient.
    shared = jax.lax.stop_gradient(embeds(policy))

    def logps(m):
      return logps_with(m, shared)

  return policy, reference, k, logps


def reference_logps(model, batch, grid, cfg, **kw):
  """[n, 2 + k] reference log-probs per pair row (chosen, rejected, then each device-made
  rejected side), as `cpo_loss_fn` uses them: what cpo.reference='precomputed' streams."""
  policy, reference, k, logps = step_logps(model, batch, grid, cfg, **kw)
  ref_c, ref_r = reference_of(policy, reference, logps)
  return jnp.concatenate([ref_c[:, None], ref_r.reshape(1 + k, -1).T], axis=1)


def cpo_loss_fn(model, batch, grid, cfg, **kw):
  """Stage 2 (CPO++): `preference_objective` over log-probs computed with the savings above.

  The reference is the same model with its LoRA adapters off, or `model.reference` when
  `model` is a PolicyAndReference; a batch with 'reference_logps' ([n, 2 + k], see
  `reference_logps`) brings its own (cpo.reference='precomputed'): no reference forward.
  Keywords: max_completion_len; pair_layout (t, g) when the batch has the grouped layout
  (`pair_images`); perturbations ((kind, severity), ...), layout (the run's PatchLayout) and
  seed for the k * n device-made pairs (`device_pairs`, needs batch['boxes']).
  """
  pol, ref_c, ref_r, k = policy_and_reference_logps(model, batch, grid, cfg, **kw)
  return preference_objective(pol, ref_c, ref_r, batch, cfg, k)


def policy_and_reference_logps(model, batch, grid, cfg, **kw):
  """(policy PairLogps, reference chosen, reference rejected, k) of a CPO batch, the reference
  streamed with the batch when it brings 'reference_logps'."""
  policy, reference, k, logps = step_logps(model, batch, grid, cfg, **kw)
  pol = logps(policy)
  if 'reference_logps' in batch:
    ref = batch['reference_logps']
    return pol, ref[:, 0], ref[:, 1:].T.reshape(-1), k
  return pol, *reference_of(policy, reference, logps), k
