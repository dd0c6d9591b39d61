"""Rotary position machinery of Qwen2.5-VL.

Host-side (numpy) index computations depend only on static shapes (image_grid_thw,
token layout) so they run outside jit; the cos/sin tables are pure jnp functions.
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np

# ---------------------------------------------------------------- language model (M-RoPE)


def get_rope_index(input_ids, attention_mask, image_grid_thw, config):
  """3D (temporal, height, width) positions, transformers' `get_rope_index` semantics.

  Text tokens advance all three axes together; a run of image tokens gets a
  (t, h/merge, w/merge) grid starting at the current position; the next text resumes
  at max(h, w)/merge after the grid start. Padding (attention_mask == 0) gets 0; a row's
  tokens are read in order skipping its padding, and image runs take the rows of
  image_grid_thw in (row, position) order. Whole-batch numpy (no loop over rows), the
  same ids and errors as `get_rope_index_per_row`.
  Returns (position_ids [3, B, L] int64, rope_deltas [B, 1] int64) as numpy arrays.
  """
  input_ids = np.asarray(input_ids)
  b, seq = input_ids.shape
  mask = (
    np.ones((b, seq), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
  )
  grids = np.asarray([] if image_grid_thw is None else image_grid_thw, np.int64).reshape(-1, 3)
  merge = config.vision_config.spatial_merge_size
  block_starts = mask.copy()
  block_starts[:, 1:] &= ~mask[:, :-1]
  if np.all(block_starts.sum(1) <= 1):  # left or right padding: each row's tokens in one block
    return _rope_index_of_blocks(input_ids, mask, grids, merge, config.image_token_id)
  # Padding between tokens: move each row's tokens to its front, compute, move them back.
  rows, cols = np.nonzero(mask)
  dest = (np.cumsum(mask, 1) - 1)[rows, cols]
  packed = np.zeros_like(input_ids)
  packed[rows, dest] = input_ids[rows, cols]
  dense = np.arange(seq)[None] < mask.sum(1)[:, None]
  pos, deltas = _rope_index_of_blocks(packed, dense, grids, merge, config.image_token_id)
  out = np.zeros_like(pos)
  out[:, rows, cols] = pos[:, rows, dest]
  return out, deltas


def _rope_index_of_blocks(input_ids, mask, grids, merge, image_token_id):
  """`get_rope_index` for rows whose attended tokens form one block each."""
  seq = input_ids.shape[1]
  is_image = mask & (input_ids == image_token_id)
  starts = is_image.copy()
  starts[:, 1:] &= ~is_image[:, :-1]
  ends = is_image.copy()
  ends[:, :-1] &= ~is_image[:, 1:]
  # flatnonzero is row-major: the order in which the image runs take the grids.
  run_row, run_start = np.divmod(np.flatnonzero(starts), seq)
  run_end = np.flatnonzero(ends) % seq
  run_len = run_end - run_start + 1
  known = min(len(run_row), len(grids))
  g = grids[:known]
  gt, gh, gw = g[:, 0], g[:, 1] // merge, g[:, 2] // merge
  wrong = np.flatnonzero(gt * gh * gw != run_len[:known])
  if wrong.size:  # the first bad run, in the order the per-row form meets it
    k = int(wrong[0])
    t, h, w = g[k].tolist()
    raise ValueError(
      f'sample {int(run_row[k])}: image run of {int(run_len[k])} tokens at '
      f'{int(run_start[k] - mask[run_row[k]].argmax())} does not match grid {(t, h, w)} '
      f'({int(gt[k] * gh[k] * gw[k])} tokens after {merge}x{merge} merge)'
    )
  if len(run_row) > known:
    raise ValueError(
      f'sample {int(run_row[known])}: more image-token runs than rows in image_grid_thw'
    )
  # A text token advances the position by 1, an image run by max(h, w) / merge (at its last
  # token): a token's piece starts at the sum of the advances before it.
  advance = (mask & ~is_image).astype(np.int64)
  advance[run_row, run_end] = np.maximum(g[:, 1], g[:, 2]) // merge
  start = np.cumsum(advance, 1)
  start -= advance
  start *= mask
  pos = np.repeat(start[None], 3, 0)
  if known:  # image tokens: their (t, h, w) cell of the run's grid, from the run's start
    offset = np.arange(run_len.sum()) - np.repeat(np.cumsum(run_len) - run_len, run_len)
    area, width = np.repeat(gh * gw, run_len), np.repeat(gw, run_len)
    flat = np.repeat(run_row * seq + run_start, run_len) + offset
    for axis, value in enumerate((offset // area, offset % area // width, offset % width)):
      pos[axis].reshape(-1)[flat] += value
  # A row's largest position: its last text token's, or an image run's far corner.
  top = start.max(1, initial=0)
  np.maximum.at(top, run_row, start[run_row, run_start] + np.maximum(gt, np.maximum(gh, gw)) - 1)
  count = mask.sum(1)
  return pos, np.where(count > 0, top + 1 - count, 0)[:, None].astype(np.int64)


def get_rope_index_per_row(input_ids, attention_mask, image_grid_thw, config):
  """`get_rope_index` one row at a time in Python, as transformers writes it: the plain form
  the vectorised one is tested (tests/test_rope_index.py) and timed (bench/bench_rope_index.py)
  against."""
  input_ids = np.asarray(input_ids)
  b, seq = input_ids.shape
  mask = (
    np.ones((b, seq), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
  )
  merge = config.vision_config.spatial_merge_size
  grids = iter([] if image_grid_thw is None else np.asarray(image_grid_thw).tolist())
  position_ids = np.zeros((3, b, seq), np.int64)
  deltas = np.zeros((b, 1), np.int64)
  for i in range(b):
    ids = input_ids[i][mask[i]]
    is_image = (ids == config.image_token_id).astype(np.int64)
    pieces, pos, start = [], 0, 0
    for kind, group in itertools.groupby(is_image.tolist()):
      n = len(list(group))
      if kind == 0:
        pieces.append(np.broadcast_to(np.arange(n) + pos, (3, n)))
        pos += n
      else:
        try:
          t, h, w = next(grids)
        except StopIteration:
          raise ValueError(
            f'sample {i}: more image-token runs than rows in image_grid_thw'
          ) from None
        gt, gh, gw = t, h // merge, w // merge
        if gt * gh * gw != n:
          raise ValueError(
            f'sample {i}: image run of {n} tokens at {start} does not match grid {(t, h, w)} '
            f'({gt * gh * gw} tokens after {merge}x{merge} merge)'
          )
        tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing='ij')
        pieces.append(np.stack([tt, hh, ww]).reshape(3, -1) + pos)
        pos += max(h, w) // merge
      start += n
    llm = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
    position_ids[:, i, mask[i]] = llm
    deltas[i, 0] = (llm.max() + 1 - len(ids)) if llm.size else 0
  return position_ids, deltas


def mrope_cos_sin(position_ids, head_dim: int, theta: float, mrope_section, dtype):
  """cos/sin [B, L, head_dim] for 3D positions [3, B, L] (pure jnp).

  Frequency band j takes its position from axis (chunk index % 3) with chunks given
  by mrope_section (which sums to head_dim // 2).
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # [3, B, L, hd/2]
  axis_of_band = np.concatenate([np.full(s, i % 3) for i, s in enumerate(mrope_section)])
  if len(axis_of_band) != head_dim // 2:
    raise ValueError(
      f'mrope_section {list(mrope_section)} must sum to head_dim/2 = {head_dim // 2}'
    )
  onehot = jnp.asarray(np.eye(3, dtype=np.float32)[axis_of_band].T)  # [3, hd/2]
  freqs = jnp.einsum('abld,ad->bld', freqs, onehot)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


# ---------------------------------------------------------------- vision tower


def vision_position_ids(grid_thw, merge: int) -> np.ndarray:
  """(h, w) patch coordinates [N, 2], laid out block-major over merge x merge blocks."""
  out = []
  for t, h, w in np.asarray(grid_thw).tolist():
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
    shape = (h // merge, merge, w // merge, merge)
    hh = hh.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    ww = ww.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    out.append(np.tile(np.stack([hh, ww], -1), (t, 1)))
  return np.concatenate(out, 0)


def vision_cu_seqlens(grid_thw) -> np.ndarray:
  """Full-attention segments: one per (image, frame)."""
  g = np.asarray(grid_thw)
  lens = np.repeat(g[:, 1] * g[:, 2], g[:, 0])
  return np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)


def vision_window_index(grid_thw, merge: int, window_size: int, patch_size: int):
  """Window reordering of merged-token groups and the window segment boundaries.

  Returns (window_index [N/merge^2] over merge groups, cu_window_seqlens in patches).
  """
  win = window_size // merge // patch_size
  unit = merge * merge
  index, cu, offset = [], [0], 0
  for t, h, w in np.asarray(grid_thw).tolist():
    gh, gw = h // merge, w // merge
    idx = np.arange(t * gh * gw).reshape(t, gh, gw)
    ph, pw = win - gh % win, win - gw % win
    nh, nw = (gh + ph) // win, (gw + pw) // win
    padded = np.pad(idx, ((0, 0), (0, ph), (0, pw)), constant_values=-100)
    padded = (
      padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, win, win)
    )
    seqlens = (padded != -100).sum((2, 3)).reshape(-1)
    flat = padded.reshape(-1)
    index.append(flat[flat != -100] + offset)
    cu.extend((np.cumsum(seqlens) * unit + cu[-1]).tolist())
    offset += t * gh * gw
  cu = np.asarray(cu, np.int64)
  cu = cu[np.concatenate([[True], cu[1:] != cu[:-1]])]  # unique_consecutive
  return np.concatenate(index), cu


def vision_cos_sin(pos_hw: np.ndarray, head_dim: int, theta: float):
  """Axial 2D rope for the vision tower: cos/sin [N, head_dim] (numpy, float32)."""
  spatial = head_dim // 2
  inv_freq = 1.0 / (theta ** (np.arange(0, spatial, 2, dtype=np.float32) / spatial))
  f = pos_hw[..., None].astype(np.float32) * inv_freq  # [N, 2, hd/4]
  f = np.concatenate([f[:, 0], f[:, 1]], -1)
  f = np.concatenate([f, f], -1)
  return np.cos(f), np.sin(f)
