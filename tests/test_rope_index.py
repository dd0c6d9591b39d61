"""M-RoPE position ids: the whole-batch `get_rope_index` equals the per-row form and transformers'."""

import numpy as np
import pytest

from cpo_jax.models import rope
from cpo_jax.models import testing

CONFIG = testing.tiny_hf_config(layers=1, depth=1)
# (t, h, w) patch grids: square, wide, tall, two frames; 2x2 merge -> 16, 8, 12, 8 tokens.
GRIDS = [(1, 8, 8), (1, 4, 8), (1, 8, 6), (2, 4, 4)]


def _batch(padding, seed=0):
  """Rows with 0, 1 and 3 images (and text only), padded 'left', 'right', or 'holes' (pad
  tokens also inside a row, even inside an image run: the ids skip them)."""
  rng = np.random.default_rng(seed)
  per_row = [[], [GRIDS[0]], [GRIDS[1], GRIDS[3], GRIDS[2]], [GRIDS[2]], []]
  text = [(5, 0), (2, 3), (1, 4), (0, 0), (0, 7)]
  inp = testing.make_inputs(per_row, text, rng)
  ids, mask = inp['input_ids'], inp['attention_mask']
  if padding == 'right':
    for r in range(len(ids)):
      ids[r], mask[r] = np.roll(ids[r], -int((mask[r] == 0).sum())), np.sort(mask[r])[::-1]
  elif padding == 'holes':
    cols = np.sort(rng.choice(ids.shape[1] + 9, 9, replace=False))
    wide_ids = np.full((len(ids), ids.shape[1] + 9), testing.PAD, ids.dtype)
    wide_mask = np.zeros_like(wide_ids)
    keep = np.setdiff1d(np.arange(wide_ids.shape[1]), cols)
    wide_ids[:, keep], wide_mask[:, keep] = ids, mask
    ids, mask = wide_ids, wide_mask
  return ids, mask, inp['image_grid_thw']


@pytest.mark.parametrize('padding', ['left', 'right', 'holes'])
def test_whole_batch_ids_equal_the_per_row_form(padding):
  ids, mask, grid = _batch(padding)
  assert len(grid) == 5 and (mask == 0).any()
  pos, deltas = rope.get_rope_index(ids, mask, grid, CONFIG)
  want_pos, want_deltas = rope.get_rope_index_per_row(ids, mask, grid, CONFIG)
  assert pos.dtype == want_pos.dtype == deltas.dtype == np.int64
  np.testing.assert_array_equal(pos, want_pos)
  np.testing.assert_array_equal(deltas, want_deltas)
  # The 3 axes differ on image tokens (so a wrong grid layout would show).
  assert (pos[1] != pos[2]).any() and (pos[0] != pos[1]).any()
  # No mask, no images: plain 0..L-1 positions on every axis.
  text = np.where(ids == testing.IMAGE, 1, ids)
  pos, deltas = rope.get_rope_index(text, None, None, CONFIG)
  np.testing.assert_array_equal(pos, np.broadcast_to(np.arange(ids.shape[1]), pos.shape))
  np.testing.assert_array_equal(deltas, 0)


@pytest.mark.parametrize('padding', ['left', 'right'])
def test_whole_batch_ids_equal_transformers(padding):
  torch = pytest.importorskip('torch')
  from transformers import Qwen2_5_VLModel

  ids, mask, grid = _batch(padding, seed=1)
  torch.manual_seed(0)
  model = Qwen2_5_VLModel(CONFIG).eval()
  want_pos, want_deltas = model.get_rope_index(
    torch.tensor(ids),
    torch.tensor((ids == testing.IMAGE).astype(np.int64)),
    torch.tensor(grid),
    attention_mask=torch.tensor(mask),
  )
  pos, deltas = rope.get_rope_index(ids, mask, grid, CONFIG)
  np.testing.assert_array_equal(pos, want_pos.numpy())
  np.testing.assert_array_equal(deltas, want_deltas.numpy().reshape(deltas.shape))


def test_bad_grids_raise_the_per_row_forms_errors():
  ids, mask, grid = _batch('right')
  wrong = grid.copy()
  wrong[2] = (1, 8, 8)  # 16 tokens for a run of 8
  cases = {'a run whose grid is another size': wrong, 'fewer grids than runs': grid[:3]}
  for name, bad in cases.items():
    with pytest.raises(ValueError) as want:
      rope.get_rope_index_per_row(ids, mask, bad, CONFIG)
    with pytest.raises(ValueError) as got:
      rope.get_rope_index(ids, mask, bad, CONFIG)
    assert str(got.value) == str(want.value), name
  assert 'does not match grid' in str(got.value) or 'more image-token runs' in str(got.value)
