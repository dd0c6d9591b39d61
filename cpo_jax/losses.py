"""Preference objectives for CPO / CPO++ (METHOD.md section 3) as pure, jit-able jnp functions.

Everything here is a function of per-token or per-sequence log-probabilities; nothing owns a model.
Formulas and metric names follow TRL's DPOTrainer (`dpo_loss`, `concatenated_forward`,
`get_batch_loss_metrics`) so runs can be compared with TRL logs line by line; tests/golden/ holds
values produced by TRL's own code.

Numerics: logits may be bf16; every log-softmax is done in float32 (or float64 under x64) and every
log-sigmoid through `jax.nn.log_sigmoid`, so no exp overflows at any margin.
"""

from __future__ import annotations

from typing import Mapping
from typing import Sequence

import jax
import jax.numpy as jnp

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
# Index = the `source` id the data pipeline writes (0 thinking, 1 perception, 2 other).
SOURCE_NAMES = ("thinking", "perception", "other")


def _compute_dtype(x):
  # Upcast low-precision inputs; keep float64 when x64 is on and the input is float64.
  return jnp.promote_types(x.dtype, jnp.float32)


# --------------------------------------------------------------------------- token / sequence logps


def token_logps(logits, labels):
  """Per-token log p(labels) -> [B, L] float32 (float64 if logits are float64).

  `logits[:, t]` predicts `labels[:, t]` (caller already shifted). Labels outside [0, V) (e.g. -100
  or pad ids at masked positions) are clipped for the gather; mask them out afterwards.
  """
  logits = logits.astype(_compute_dtype(logits))
  labels = jnp.clip(labels, 0, logits.shape[-1] - 1)
  picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  # log_softmax gathered at the label == picked - logsumexp; never materialises a second [B,L,V].
  return picked - jax.nn.logsumexp(logits, axis=-1)


def token_logps_from_hidden(hidden, kernel, labels, *, chunk_size=128):
  """Per-token log p(labels) from final hidden states without materialising [B, L, V] logits.

  hidden [B, L, H] (already final-normed; gather completion positions first to project only
  there), kernel [H, V] (the lm_head kernel; for tied embeddings pass `embedding.T`), labels [B, L].
  The sequence is processed in chunks of `chunk_size` positions under `jax.checkpoint`, so both the
  forward and the backward pass hold at most one [B, chunk, V] float32 block of logits (XLA temp measured at
  about 3 such blocks with the backward; bench/bench_losses.py). Logits accumulate in float32 even for bf16
  inputs, so this is also more accurate than projecting to bf16 logits first.
  """
  b, length, h = hidden.shape
  chunk = max(1, min(int(chunk_size), length))
  pad = (-length) % chunk
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    labels = jnp.pad(labels, ((0, 0), (0, pad)))
  n = (length + pad) // chunk
  hs = hidden.reshape(b, n, chunk, h).swapaxes(0, 1)  # [n, B, c, H]
  ls = labels.reshape(b, n, chunk).swapaxes(0, 1)  # [n, B, c]
  acc = jnp.promote_types(jnp.promote_types(hidden.dtype, kernel.dtype), jnp.float32)

  @jax.checkpoint  # why: recompute the chunk's logits in the backward pass instead of storing them
  def one_chunk(args):
    hc, lc = args
    logits = jnp.einsum("bch,hv->bcv", hc, kernel, preferred_element_type=acc)
    return token_logps(logits, lc)

  out = jax.lax.map(one_chunk, (hs, ls))  # [n, B, c]
  return out.swapaxes(0, 1).reshape(b, n * chunk)[:, :length]


def compact_completion(hidden, labels, loss_mask, num_positions):
  """Move the completion positions of each row to the front, keeping order; static size `num_positions`.

  [B, L, H], [B, L], [B, L] -> (hidden [B, P, H], labels [B, P], loss_mask [B, P], n_dropped [B]) with
  P = num_positions (a Python int). Feeding the result to `token_logps_from_hidden` projects to the
  vocabulary only where the loss needs it. n_dropped counts completion tokens beyond P (never silently:
  the caller must treat n_dropped > 0 as an error or a counted skip).
  """
  mask = loss_mask.astype(bool)
  order = jnp.argsort(~mask, axis=1, stable=True)[
    :, :num_positions
  ]  # completion positions first, in order
  take = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)
  kept = take(loss_mask)
  n_dropped = mask.sum(axis=1) - kept.astype(bool).sum(axis=1)
  return take(hidden), take(labels), kept, n_dropped


def reduce_sequence(per_token_logps, loss_mask):
  """(sum_logps [B], mean_logps [B], n_tokens [B]) over the positions where loss_mask is set."""
  mask = loss_mask.astype(bool)
  lp = jnp.where(mask, per_token_logps, 0.0)  # where, not multiply: ignores junk at masked slots
  n_tokens = mask.sum(axis=-1)
  total = lp.sum(axis=-1)
  mean = total / jnp.maximum(n_tokens, 1).astype(total.dtype)
  return total, mean, n_tokens


def sequence_logps(logits, labels, loss_mask):
  """log pi(y|x) as TRL: SUM of completion-token log-probs; also the mean and the token count.

  logits [B, L, V] (any float dtype), labels [B, L], loss_mask [B, L] (1 at completion tokens).
  Returns (sum_logps [B], mean_logps [B], n_tokens [B]). TRL's `ipo` uses the mean (see
  `logps_for_loss`).
  """
  return reduce_sequence(token_logps(logits, labels), loss_mask)


def logps_for_loss(sum_logps, mean_logps, loss_type):
  """The per-sequence logps TRL feeds to `dpo_loss`: the mean for `ipo`, the sum otherwise.

  (TRL's concatenated_forward divides by the completion length only for loss_type == "ipo".)
  """
  return mean_logps if loss_type == "ipo" else sum_logps


def nll_from_token_logps(per_token_logps, loss_mask):
  """Mean token NLL over all masked tokens of the batch (token-weighted, as TRL's cross_entropy)."""
  mask = loss_mask.astype(bool)
  total = jnp.where(mask, per_token_logps, 0.0).sum()
  return -total / jnp.maximum(mask.sum(), 1).astype(total.dtype)


def sft_loss(logits, labels, loss_mask):
  """Mean token NLL over completion tokens: the SFT loss and the CPO++ rpo_alpha term (on y+)."""
  return nll_from_token_logps(token_logps(logits, labels), loss_mask)


# --------------------------------------------------------------------------- preference losses


def pair_metrics(
  policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1
):
  """Per-example TRL metrics [B] (gradient stopped): rewards/*, logps/*.

  rewards/accuracies uses a strict `>`: a tie (e.g. policy == reference at step 0) is NOT accurate.
  """
  sg = jax.lax.stop_gradient
  chosen_rewards = beta * sg(policy_chosen_logps - ref_chosen_logps)
  rejected_rewards = beta * sg(policy_rejected_logps - ref_rejected_logps)
  return {
    "rewards/chosen": chosen_rewards,
    "rewards/rejected": rejected_rewards,
    "rewards/margins": chosen_rewards - rejected_rewards,
    "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(chosen_rewards.dtype),
    "logps/chosen": sg(policy_chosen_logps),
    "logps/rejected": sg(policy_rejected_logps),
  }


def preference_loss(
  policy_chosen_logps,
  policy_rejected_logps,
  ref_chosen_logps,
  ref_rejected_logps,
  *,
  beta=0.1,
  loss_type="sigmoid",
  label_smoothing=0.0,
):
  """TRL's DPO-family losses on per-sequence logps -> (per_example_losses [B], metrics of batch means).

  delta = (pi_c - ref_c) - (pi_r - ref_r)
    sigmoid: -(1-eps) log_sigmoid(beta delta) - eps log_sigmoid(-beta delta)   (eps > 0: cDPO)
    robust:  (-(1-eps) log_sigmoid(beta delta) + eps log_sigmoid(-beta delta)) / (1 - 2 eps)
    hinge:   relu(1 - beta delta)
    ipo:     (delta - 1/(2 beta))^2          (pass mean logps, see `logps_for_loss`)
  `beta`, `loss_type`, `label_smoothing` are Python values (static under jit).
  Metrics are computed from the logps passed in; TRL logs rewards from SUM logps even for ipo, so for
  TRL-identical logs under ipo use `pair_metrics(*sum_logps, beta=beta)`.
  TRL >= 1.0 dropped label smoothing from its `sigmoid` branch; eps > 0 here is cDPO as TRL <= 0.2x had it
  (and as TRL 1.16's `aot` branch still computes it per pair).
  """
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"loss_type={loss_type!r}; expected one of {LOSS_TYPES}")
  if not 0.0 <= label_smoothing <= 0.5:
    raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 0.5]")
  if loss_type == "robust" and label_smoothing == 0.5:
    raise ValueError(
      "loss_type='robust' divides by 1 - 2*label_smoothing; use label_smoothing < 0.5"
    )
  if beta <= 0:
    raise ValueError(f"beta={beta} must be > 0")

  logits = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
  eps = label_smoothing
  if loss_type == "sigmoid":
    losses = (
      -jax.nn.log_sigmoid(beta * logits) * (1 - eps) - jax.nn.log_sigmoid(-beta * logits) * eps
    )
  elif loss_type == "robust":
    losses = (
      -jax.nn.log_sigmoid(beta * logits) * (1 - eps) + jax.nn.log_sigmoid(-beta * logits) * eps
    ) / (1 - 2 * eps)
  elif loss_type == "hinge":
    losses = jax.nn.relu(1 - beta * logits)
  else:  # ipo: beta is IPO's tau (eq. 17 of Azar et al.)
    losses = (logits - 1 / (2 * beta)) ** 2

  per_example = pair_metrics(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta
  )
  metrics = {k: v.mean() for k, v in per_example.items()}
  return losses, metrics


def cpo_plus_weights(source, sample_weight=None, source_weights=(1.0, 1.0, 1.0), normalize=True):
  """w_i = source_weights[source_i] * sample_weight_i, optionally normalised to batch mean 1.

  If every weight in the batch is 0 the normalisation is skipped (the loss is then 0, not NaN).
  """
  sw_table = jnp.asarray(source_weights, dtype=float)  # float64 under x64
  w = sw_table[jnp.clip(source, 0, sw_table.shape[0] - 1)]
  if sample_weight is not None:
    w = w * sample_weight.astype(w.dtype)
  if normalize:
    mean = w.mean()
    w = jnp.where(mean > 0, w / jnp.where(mean > 0, mean, 1.0), w)
  return w


def cpo_plus_loss(
  per_example_losses, source, sample_weight=None, source_weights=(1.0, 1.0, 1.0), normalize=True
):
  """CPO++ ("Eq. 9"): mean_i(w_i * l_i) with `cpo_plus_weights`. Add rpo_alpha * NLL(y+) outside."""
  w = cpo_plus_weights(source, sample_weight, source_weights, normalize).astype(
    per_example_losses.dtype
  )
  return (w * per_example_losses).mean()


# --------------------------------------------------------------------------- per-source metrics


def per_source_metrics(
  per_example: Mapping[str, jax.Array], source, *, names: Sequence[str] = SOURCE_NAMES
):
  """Per-source means of per-example metrics: '{name}/{key}' plus '{name}/count'.

  `per_example` maps metric names (e.g. from `pair_metrics`, or 'loss') to [B] arrays; `source` [B]
  holds indices into `names`. Static keys under jit, so an absent source cannot be omitted on
  device: its means are 0.0 and its '{name}/count' is 0. Call `drop_absent` on host before logging.
  """
  out = {}
  for i, name in enumerate(names):
    sel = source == i
    count = sel.sum()
    denom = jnp.maximum(count, 1)
    for key, value in per_example.items():
      out[f"{name}/{key}"] = jnp.where(sel, value, 0).sum() / denom.astype(value.dtype)
    out[f"{name}/count"] = count
  return out


def drop_absent(metrics: Mapping, *, names: Sequence[str] = SOURCE_NAMES):
  """Host-side: remove '{name}/...' entries of sources whose '{name}/count' is 0 (keeps the count)."""
  absent = {n for n in names if f"{n}/count" in metrics and int(metrics[f"{n}/count"]) == 0}
  return {
    k: v
    for k, v in metrics.items()
    if not (k.split("/", 1)[0] in absent and not k.endswith("/count"))
  }
