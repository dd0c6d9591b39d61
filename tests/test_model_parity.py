"""cpo_jax's Qwen2.5-VL equals transformers' PyTorch Qwen2_5_VLForConditionalGeneration.

Tiny random transformers models (every weight perturbed so a wrong mapping shows) are
saved with save_pretrained, loaded with load_hf, and fed identical processor-shaped
inputs (left padding, one and two images per sample).
"""

import numpy as np
import pytest

torch = pytest.importorskip('torch')

from flax import nnx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: E402

from cpo_jax.models import get_rope_index  # noqa: E402
from cpo_jax.models import load_hf  # noqa: E402
from cpo_jax.models import testing  # noqa: E402

CASES = {
  # GQA 2, window 56 (2x2 merged tokens per window), full attention in block 1, tied.
  'gqa2_tied_one_image': dict(
    cfg=dict(heads=4, kv_heads=2, window=56, fullatt=(1,), tied=True),
    grids=[[(1, 8, 8)], [(1, 8, 8)]],
    text=[(3, 4), (1, 2)],
  ),
  # GQA 4, 4 vision heads, window 112 with ragged edge windows, full attention in blocks 0 and 2,
  # untied, two images of different sizes per sample.
  'gqa4_untied_two_images': dict(
    cfg=dict(
      heads=4,
      kv_heads=1,
      v_heads=4,
      v_hidden=64,
      depth=3,
      window=112,
      fullatt=(0, 2),
      tied=False,
      mrope=(4, 2, 2),
    ),
    grids=[[(1, 12, 8), (1, 4, 4)], [(1, 4, 6), (1, 10, 10)]],
    text=[(2, 3), (5, 1)],
  ),
  # Plain multi-head attention, windows only (no full-attention block), 3 layers.
  'mha_window_only': dict(
    cfg=dict(heads=2, kv_heads=2, layers=3, window=28, fullatt=(), tied=False, mrope=(8, 4, 4)),
    grids=[[(1, 6, 10)], [(1, 6, 10)], [(1, 6, 10)]],
    text=[(1, 1), (6, 2), (3, 3)],
  ),
}


def _torch_model(cfg, seed=0):
  torch.manual_seed(seed)
  model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
  return testing.randomize_torch_model(model, seed)


def _torch_logits(model, inp):
  mm = (inp['input_ids'] == model.config.image_token_id).astype(np.int64)
  with torch.no_grad():
    out = model(
      input_ids=torch.tensor(inp['input_ids']),
      attention_mask=torch.tensor(inp['attention_mask']),
      pixel_values=torch.tensor(inp['pixel_values']),
      image_grid_thw=torch.tensor(inp['image_grid_thw']),
      mm_token_type_ids=torch.tensor(mm),
    )
  return out.logits.numpy()


@pytest.fixture(scope='module', params=sorted(CASES))
def case(request, tmp_path_factory):
  spec = CASES[request.param]
  cfg = testing.tiny_hf_config(**spec['cfg'])
  tmodel = _torch_model(cfg)
  path = str(tmp_path_factory.mktemp(request.param))
  tmodel.save_pretrained(path)
  inp = testing.make_inputs(spec['grids'], spec['text'], np.random.default_rng(0))
  return dict(cfg=cfg, tmodel=tmodel, model=load_hf(path), inp=inp)


def _jax_outputs(model, inp, cfg):
  """One compiled program: image features, logits from pixels, logits from precomputed features."""
  grid = inp['image_grid_thw']
  pos, _ = get_rope_index(inp['input_ids'], inp['attention_mask'], grid, cfg)

  @nnx.jit
  def run(m, ids, mask, pix, pos):
    feats = m.encode_images(pix, grid)
    from_pixels = m(ids, mask, pix, grid, pos)
    h = m.hidden_states(ids, mask, image_grid_thw=grid, position_ids=pos, image_embeds=feats)
    return feats, from_pixels, m.logits_from_hidden(h)

  return [
    np.asarray(x)
    for x in run(model, inp['input_ids'], inp['attention_mask'], inp['pixel_values'], pos)
  ]


def test_logits_and_image_features_match_transformers(case):
  inp, model, tmodel = case['inp'], case['model'], case['tmodel']
  want = _torch_logits(tmodel, inp)
  with torch.no_grad():
    want_feats = tmodel.model.get_image_features(
      torch.tensor(inp['pixel_values']), torch.tensor(inp['image_grid_thw'])
    ).pooler_output
    want_feats = torch.cat(list(want_feats)).numpy()
  feats, got, got_from_feats = _jax_outputs(model, inp, case['cfg'])
  valid = inp['attention_mask'].astype(bool)  # padded query rows are garbage in both
  assert got.shape == want.shape
  assert np.abs(want[valid]).max() > 0.5, 'logits too small for a meaningful comparison'
  diff = np.abs(got - want)[valid].max()
  print(f'max abs logit diff {diff:.2e}')
  assert diff <= 1e-4, diff
  assert np.abs(feats - want_feats).max() <= 1e-4
  # encode once, reuse: passing image_embeds equals passing pixel_values
  np.testing.assert_allclose(got_from_feats, got, atol=1e-6)


def test_rope_index_matches_transformers(case):
  inp, tmodel = case['inp'], case['tmodel']
  mm = (inp['input_ids'] == case['cfg'].image_token_id).astype(np.int64)
  want_pos, want_delta = tmodel.model.get_rope_index(
    torch.tensor(inp['input_ids']),
    torch.tensor(mm),
    torch.tensor(inp['image_grid_thw']),
    attention_mask=torch.tensor(inp['attention_mask']),
  )
  pos, delta = get_rope_index(
    inp['input_ids'], inp['attention_mask'], inp['image_grid_thw'], case['cfg']
  )
  np.testing.assert_array_equal(pos, want_pos.numpy())
  np.testing.assert_array_equal(delta, want_delta.numpy())


def test_text_only_and_eager_position_ids():
  """No image at all; position_ids computed by the model from the attention mask."""
  cfg = testing.tiny_hf_config(layers=1, depth=1)
  tmodel = _torch_model(cfg, seed=1)
  import tempfile

  with tempfile.TemporaryDirectory() as d:
    tmodel.save_pretrained(d)
    model = load_hf(d)
    chunked = load_hf(d, attention_chunk=3)  # 7 query rows in 3 blocks, the last one padded
  ids = np.random.default_rng(1).integers(1, testing.IMAGE, (2, 7))
  with torch.no_grad():
    want = tmodel(input_ids=torch.tensor(ids)).logits.numpy()
  for m in (model, chunked):
    got = np.asarray(m(jnp.asarray(ids)))
    assert np.abs(got - want).max() <= 1e-4


def test_mismatched_image_tokens_raise():
  cfg = testing.tiny_hf_config(layers=1, depth=1)
  from cpo_jax.models import Qwen2_5_VL

  model = Qwen2_5_VL(cfg, rngs=nnx.Rngs(0))
  inp = testing.make_inputs([[(1, 4, 4)]], [(1, 1)], np.random.default_rng(0))
  ids = inp['input_ids'].copy()
  ids[ids == testing.IMAGE] = 5  # drop the placeholders
  with pytest.raises(ValueError, match='image tokens'):
    model(ids, inp['attention_mask'], inp['pixel_values'], inp['image_grid_thw'])
