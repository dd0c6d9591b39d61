"""The grouped pair layout in the step: a thinking pair's image is encoded once.

With `data.pair_layout='grouped'` every CPO++ batch comes in row groups of g pairs whose first
t are thinking pairs (the rejected image is the chosen one) and the rest perception pairs
(`data.datasets.pair_layout_for`). The step knows the layout statically, so it encodes each
thinking pair's image once and reuses the embedding for both sides; the host checks every
batch really has that layout before it reaches the step.
"""

import jax.numpy as jnp
import numpy as np

from cpo_jax.train.completion import grid_rows


def check_pair_layout(batch, layout):
  """Host-side: the batch really has the grouped layout the step assumes (else raise)."""
  t, g = layout
  n = batch['source'].shape[0]
  if n % g:
    raise ValueError(
      f'batch of {n} pairs does not split into groups of {g} (pair layout {layout}).'
    )
  is_thinking = (np.arange(n) % g) < t
  source = np.asarray(batch['source'])
  if not (np.all(source[is_thinking] == 0) and np.all(source[~is_thinking] != 0)):
    raise ValueError(
      f'batch sources {source.tolist()} do not follow the pair layout {layout}: rows '
      f'r with r % {g} < {t} must be thinking pairs (source 0), the others not.'
    )
  chosen = per_row(np.asarray(batch['chosen_pixel_values']), n)[is_thinking]
  rejected = per_row(np.asarray(batch['rejected_pixel_values']), n)[is_thinking]
  if not np.array_equal(chosen, rejected):
    raise ValueError(
      'a thinking pair of the batch has a rejected image that differs from its chosen one.'
    )


def per_row(x, rows, groups=None):
  """[rows * P, D] -> [rows, P, D]; with `groups`: [rows / groups, groups, P, D]."""
  x = x.reshape(rows, -1, x.shape[-1])
  return x if groups is None else x.reshape(rows // groups, groups, *x.shape[1:])


def pair_image_embeds(model, batch, grid, layout=None, extra_pixels=None, score_bytes=None):
  """Image embeddings of the concatenated rows (chosen [n], rejected [n], extra [k * n]).

  With a pair `layout` (t, g), a thinking pair's rejected image is its chosen image: it is
  encoded once and its embedding reused, so a step encodes n + n * (g - t) / g + k * n
  images instead of (2 + k) * n. The reshape keeps each row group on its data shard.
  score_bytes: the vision attention's block size (`layers.segment_attention`)."""
  n = batch['chosen_input_ids'].shape[0]
  encode = lambda pixels, rows: model.encode_images(pixels, grid_rows(rows, grid), score_bytes)
  chosen = encode(batch['chosen_pixel_values'], n)
  t, g = layout or (0, 1)
  if t == 0:
    rejected = encode(batch['rejected_pixel_values'], n)
  else:
    own_rows = n // g * (g - t)
    parts = [per_row(chosen, n, g)[:, :t]]
    if own_rows:
      own = per_row(batch['rejected_pixel_values'], n, g)[:, t:]
      own = encode(own.reshape(-1, own.shape[-1]), own_rows)
      parts.append(per_row(own, own_rows, g - t))
    rejected = jnp.concatenate(parts, axis=1).reshape(chosen.shape)
  if extra_pixels is not None:
    patches = batch['chosen_pixel_values'].shape[0] // n
    return jnp.concatenate(
      [chosen, rejected, encode(extra_pixels, extra_pixels.shape[0] // patches)]
    )
  return jnp.concatenate([chosen, rejected])
