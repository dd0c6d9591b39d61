"""Completion log-probs: the per-sequence numbers every loss of a stage is made of.

log pi(y | x) is the SUM of the per-token log-probs of the completion tokens only (prompt and
image masked out), as in TRL. The step projects to the vocabulary only at completion positions:
`losses.compact_completion` moves them to the front of a static-size slab, then a chunked
projection fused with the log-softmax; never [B, L, V] logits over the image and prompt
(DESIGN.md, "Where the time goes"). A completion token that does not fit the slab is an error.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cpo_jax import losses

# loss_mask values the CPO++ step gives the answer tokens (after '</think>') and the closing
# end token when the preference weighs them apart (cpo.answer_weight, cpo.end_token_weight:
# `objectives.mark_answer_tokens`); they count in `total` like every completion token. The
# pipeline's masks hold 0 and 1.
ANSWER_TOKEN = 2
END_TOKEN = 3


class CompletionLogps(NamedTuple):
  """Per-sequence completion log-probs [B] of one forward."""

  total: jax.Array  # summed over the completion tokens
  mean: jax.Array  # total / count (what IPO uses)
  count: jax.Array  # completion tokens per row
  dropped: jax.Array  # completion tokens beyond the static slab (must be 0)
  answer_total: jax.Array  # the part of `total` over the ANSWER_TOKEN positions
  answer_count: jax.Array  # ANSWER_TOKEN positions per row
  end_total: jax.Array  # the part of `total` at the END_TOKEN position
  end_count: jax.Array  # END_TOKEN positions per row (0 or 1)


def reduce_completion(per_token_logps, mask, dropped):
  """`CompletionLogps` of per-token log-probs [B, P] under the row mask [B, P]."""
  total, mean, count = losses.reduce_sequence(per_token_logps, mask)
  answer_total, _, answer_count = losses.reduce_sequence(per_token_logps, mask == ANSWER_TOKEN)
  end_total, _, end_count = losses.reduce_sequence(per_token_logps, mask == END_TOKEN)
  return CompletionLogps(
    total, mean, count, dropped, answer_total, answer_count, end_total, end_count
  )


def label_logps(model, hidden, labels):
  """Per-token log-probs [B, P] of `labels` from final hidden states [B, P, H]: the chunked
  projection with the head's matrix, or the model's head when it is more than a matrix."""
  kernel = lm_head_kernel(model)
  if kernel is None:
    return losses.token_logps(model.logits_from_hidden(hidden), labels)
  return losses.token_logps_from_hidden(hidden, kernel, labels)


def lm_head_kernel(model):
  """The [H, V] matrix `model.logits_from_hidden` applies, in the compute dtype; None when the
  head is more than a matrix (a bias or an adapter on it): callers then use the model's head."""
  if model.lm_head is None:  # tied embeddings
    return model.embed_tokens[...].astype(model.dtype).T
  head = model.lm_head
  if head.bias is not None or (head.lora_a is not None and head.lora_enabled):
    return None
  return head.kernel[...].astype(model.dtype)


def completion_positions(seq_len, grid, model, max_completion_len=0):
  """Static number of label slots that can hold completion tokens.

  Every sequence carries exactly prod(grid) / merge^2 image tokens and they are never
  completion tokens; labels are input_ids[:, 1:], so at least all but one of them sit
  among the labels: at most seq_len - n_image completion labels. `max_completion_len`
  (config data.max_completion_len, 0 = unset) tightens it; a row with more completion
  tokens is an error (`check_completion_lengths`, and the in-graph count)."""
  merge = model.config.vision_config.spatial_merge_size
  n_image = int(np.prod(np.asarray(grid))) // merge**2
  bound = max(1, int(seq_len) - n_image)
  return min(bound, int(max_completion_len)) if max_completion_len else bound


def check_completion_lengths(batch, num_positions, prefixes=('',)):
  """Host-side: raise if any row has more completion labels than the static slab holds."""
  for p in prefixes:
    counts = np.asarray(batch[p + 'loss_mask'])[:, 1:].astype(bool).sum(axis=1)
    if counts.max(initial=0) > num_positions:
      row = int(counts.argmax())
      raise ValueError(
        f'{p}loss_mask row {row} has {int(counts[row])} completion tokens but the step '
        f'keeps {num_positions} (data.max_completion_len); raise data.max_completion_len '
        f'(0 = derive it from max_len and the image size). Tokens are never dropped.'
      )


def completion_logps(
  model,
  input_ids,
  attention_mask,
  loss_mask,
  position_ids,
  *,
  pixel_values=None,
  image_grid_thw=None,
  image_embeds=None,
  num_positions=None,
):
  """Per-sequence `CompletionLogps` of the completion tokens; token t is predicted at t-1. `position_ids` is batch-major [B, 3, L] (see `stages.step_inputs`).

  num_positions=None projects every position to the vocabulary (the straightforward way);
  an int projects only the first `num_positions` completion labels of each row (chunked,
  no [B, L, V] logits) and `dropped` counts completion tokens beyond them (must be 0)."""
  hidden = model.hidden_states(
    input_ids,
    attention_mask=attention_mask,
    pixel_values=pixel_values,
    image_grid_thw=image_grid_thw,
    position_ids=jnp.swapaxes(position_ids, 0, 1),
    image_embeds=image_embeds,
  )
  hidden, labels, mask = hidden[:, :-1], input_ids[:, 1:], loss_mask[:, 1:]
  if num_positions is None:
    per_token = losses.token_logps(model.logits_from_hidden(hidden), labels)
    return reduce_completion(per_token, mask, jnp.zeros(mask.shape[:1], jnp.int32))
  hidden, labels, mask, dropped = losses.compact_completion(hidden, labels, mask, num_positions)
  return reduce_completion(label_logps(model, hidden, labels), mask, dropped)


def token_mean_nll(sum_logps, n_tokens):
  """Mean NLL over all completion tokens of the batch, as TRL's SFT loss and rpo term."""
  return -jnp.sum(sum_logps) / jnp.maximum(jnp.sum(n_tokens), 1)


def guard_dropped(loss, dropped):
  """A completion token that did not fit the static slab is an error, never a silent
  truncation: raised at once on concrete values; under jit the host check in the stage's
  `prepare` raises first, and this NaN (plus the count metric) stops the loop if it did not."""
  total = jnp.sum(dropped)
  if not isinstance(total, jax.core.Tracer) and int(total) > 0:
    raise ValueError(
      f'{int(total)} completion tokens do not fit the static completion slab; '
      f'raise data.max_completion_len.'
    )
  return jnp.where(total > 0, jnp.nan, loss), total


def grid_rows(batch_size, grid):
  """[batch_size, 3]: one static grid row per image; numpy, so the vision tower's window
  tables are constants."""
  return np.tile(np.asarray(grid).reshape(1, 3), (batch_size, 1))
