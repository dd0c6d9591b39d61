"""The shared-prefix step: a thinking pair's image and prompt run through the LLM once.

In a grouped CPO++ batch (`pair_images`) the first t rows of every group of g pairs are thinking
pairs: chosen and rejected share the image and the prompt and differ only in the completion.
The step moves each such prompt (image tokens included) into a left-padded prefix of static
length P (`data.max_prompt_len`) and both completions into right-padded continuations of static
length S (the completion slab, `completion.completion_positions`), and runs the prefix once with
`hidden_states_shared_prefix`: both continuations attend to its KV cache. A thinking pair then
costs P + 2S tokens of the LLM instead of two full rows, with the same log-probs (exact; the
tests compare loss, metrics and gradients with the full-row step). The other pairs (and
device-made ones) go through full rows as before.
"""

import jax
import jax.numpy as jnp
import numpy as np

from cpo_jax.train import completion


def prefix_sizes(length, num_positions, max_prompt_len, pair_layout=(1, 1), enabled=True):
  """(P, S): static prefix and continuation lengths for rows of `length` tokens, or None when
  the step keeps full rows: switched off (cpo.shared_prefix), no thinking pairs in the grouped
  `pair_layout` (t, g) (or none), or no saving (P + 2S >= 2 * length: e.g. no
  data.max_prompt_len set). The stage's host check and the step both decide with this."""
  if not enabled or pair_layout is None or not pair_layout[0]:
    return None
  p = min(int(max_prompt_len), length) if max_prompt_len else length
  s = min(int(num_positions), length)
  return (p, s) if p + 2 * s < 2 * length else None


def thinking_rows(x, t, g):
  """[n, ...] -> ([n t / g, ...] the thinking rows, [n (g - t) / g, ...] the others), group-major
  (each group stays on its data shard)."""
  groups = x.reshape(-1, g, *x.shape[1:])
  return groups[:, :t].reshape(-1, *x.shape[1:]), groups[:, t:].reshape(-1, *x.shape[1:])


def interleave(thinking, rest, t, g):
  """The inverse of `thinking_rows` on the leading axis."""
  tail = thinking.shape[1:]
  parts = [thinking.reshape(-1, t, *tail)]
  if g > t:
    parts.append(rest.reshape(-1, g - t, *tail))
  return jnp.concatenate(parts, axis=1).reshape(-1, *tail)


def prompt_lengths(loss_mask):
  """[B]: tokens before the completion (packing marks the completion as one run of 1s)."""
  has = jnp.any(loss_mask > 0, axis=1)
  return jnp.where(has, jnp.argmax(loss_mask > 0, axis=1), jnp.sum(loss_mask >= 0, axis=1))


def _gather(x, index, valid):
  """x [B, L, ...] at index [B, W] along axis 1; zero where not `valid`."""
  out = jnp.take_along_axis(
    x, jnp.clip(index, 0, x.shape[1] - 1).reshape(*index.shape, *(1,) * (x.ndim - 2)), axis=1
  )
  return jnp.where(valid.reshape(*valid.shape, *(1,) * (x.ndim - 2)), out, 0)


def split_rows(rows, prompt_len, p_len, s_len):
  """Full right-padded rows -> (prefix, continuation) dicts.

  prefix: the first prompt_len tokens, left-padded to p_len (input_ids, attention_mask,
  position_ids [B, 3, P]); continuation: the next s_len tokens, right-padded (input_ids,
  attention_mask, loss_mask)."""
  length = rows['input_ids'].shape[1]
  idx = jnp.arange(p_len)[None] - (p_len - prompt_len)[:, None]
  valid = idx >= 0
  prefix = {k: _gather(rows[k], idx, valid) for k in ('input_ids', 'attention_mask')}
  pos = jnp.swapaxes(rows['position_ids'], 1, 2)  # [B, L, 3]
  prefix['position_ids'] = jnp.swapaxes(_gather(pos, idx, valid), 1, 2)
  idx = prompt_len[:, None] + jnp.arange(s_len)[None]
  valid = idx < length
  cont = {k: _gather(rows[k], idx, valid) for k in ('input_ids', 'attention_mask', 'loss_mask')}
  return prefix, cont


def check_prefix_fits(batch, layout, p_len, prefixes=('chosen_', 'rejected_')):
  """Host-side: every thinking pair's prompt fits the prefix and is the same on both sides."""
  t, g = layout
  n = batch['source'].shape[0]
  thinking = (np.arange(n) % g) < t
  lengths = {}
  for p in prefixes:
    mask = np.asarray(batch[p + 'loss_mask'])[thinking] > 0
    lengths[p] = np.where(mask.any(1), mask.argmax(1), mask.shape[1])
  too_long = np.flatnonzero(lengths[prefixes[0]] > p_len)
  if too_long.size:
    row = int(np.flatnonzero(thinking)[too_long[0]])
    raise ValueError(
      f'thinking pair row {row} has a prompt of {int(lengths[prefixes[0]][too_long[0]])} tokens '
      f'(image tokens included) but data.max_prompt_len is {p_len}; raise it (0 = no shared '
      'prefix). Prompts are never cut.'
    )
  ids = [np.asarray(batch[p + 'input_ids'])[thinking] for p in prefixes]
  for r, (lc, lr) in enumerate(zip(*lengths.values())):
    if lc != lr or not np.array_equal(ids[0][r, :lc], ids[1][r, :lr]):
      row = int(np.flatnonzero(thinking)[r])
      raise ValueError(
        f'thinking pair row {row}: the chosen and rejected prompts differ; a thinking pair '
        'shares its image and prompt (only the completion is counterfactual).'
      )


def thinking_logps(model, chosen, rejected, image_embeds, sizes):
  """`CompletionLogps` of the thinking pairs' [chosen; rejected] rows ([2 n_t]) from one prefix
  pass. chosen/rejected: their full rows (`objectives.pair_rows` keys); image_embeds: one image
  per pair, [n_t * tokens, D]."""
  p_len, s_len = sizes
  prompt_len = prompt_lengths(chosen['loss_mask'])
  prefix, cont_c = split_rows(chosen, prompt_len, p_len, s_len)
  _, cont_r = split_rows(rejected, prompt_len, p_len, s_len)
  stack = lambda key: jnp.stack([cont_c[key], cont_r[key]])  # [2, n_t, S]
  h_prefix, h_cont = model.hidden_states_shared_prefix(
    prefix['input_ids'],
    prefix['attention_mask'],
    stack('input_ids'),
    stack('attention_mask'),
    prefix_position_ids=jnp.swapaxes(prefix['position_ids'], 0, 1),
    image_embeds=image_embeds,
  )
  # token s of a continuation is predicted at s - 1; its first token at the prefix's last position
  last = jnp.broadcast_to(h_prefix[None, :, -1:], (2, *h_prefix[:, -1:].shape))
  hidden = jnp.concatenate([last, h_cont[:, :, :-1]], axis=2).reshape(-1, s_len, h_cont.shape[-1])
  labels, mask = stack('input_ids').reshape(-1, s_len), stack('loss_mask').reshape(-1, s_len)
  rows_mask = jnp.concatenate([chosen['loss_mask'], rejected['loss_mask']])
  dropped = jnp.sum(rows_mask[:, 1:] > 0, axis=1) - jnp.sum(mask > 0, axis=1)
  return completion.reduce_completion(completion.label_logps(model, hidden, labels), mask, dropped)


def pair_completion_logps(model, rows, n, image_embeds, layout, sizes, num_positions):
  """`CompletionLogps` of all concatenated pair rows (`objectives.pair_rows`: chosen [n],
  rejected [n], k device-made blocks), in that order, the thinking pairs through one shared
  prefix and every other row as a full row. image_embeds: `pair_images.pair_image_embeds`."""
  t, g = layout
  total_rows = rows['input_ids'].shape[0]
  per_image = image_embeds.reshape(total_rows, -1, image_embeds.shape[-1])
  block = lambda x, i: x[i * n : (i + 1) * n]
  sides = [{key: block(v, i) for key, v in rows.items()} for i in (0, 1)]
  split = [{key: thinking_rows(v, t, g) for key, v in side.items()} for side in sides]
  think = {s: {key: v[0] for key, v in split[i].items()} for i, s in enumerate('cr')}
  rest = {s: {key: v[1] for key, v in split[i].items()} for i, s in enumerate('cr')}
  chosen_images = thinking_rows(block(per_image, 0), t, g)
  flat = lambda x: x.reshape(-1, x.shape[-1])
  thought = thinking_logps(model, think['c'], think['r'], flat(chosen_images[0]), sizes)
  n_t = thought.total.shape[0] // 2
  full_rows = {
    key: jnp.concatenate([rest['c'][key], rest['r'][key], v[2 * n :]]) for key, v in rows.items()
  }
  if full_rows['input_ids'].shape[0]:
    rest_images = jnp.concatenate(
      [chosen_images[1], thinking_rows(block(per_image, 1), t, g)[1], per_image[2 * n :]]
    )
    full = completion.completion_logps(
      model, **full_rows, image_embeds=flat(rest_images), num_positions=num_positions
    )
  else:
    full = jax.tree.map(lambda x: x[:0], thought)
  n_r = n - n_t

  def merged(a, b):  # original order: chosen, rejected, then the device-made blocks
    return jnp.concatenate(
      [
        interleave(a[:n_t], b[:n_r], t, g),
        interleave(a[n_t:], b[n_r : 2 * n_r], t, g),
        b[2 * n_r :],
      ]
    )

  return completion.CompletionLogps(*(merged(a, b) for a, b in zip(thought, full)))
