"""Presets, parameter metadata and dtype/remat variants of the model."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpo_jax.models import Qwen2_5_VL
from cpo_jax.models import get_config
from cpo_jax.models import get_rope_index
from cpo_jax.models import testing

LOGICAL = {
  'embed',
  'mlp',
  'heads',
  'kv_heads',
  'head_dim',
  'vocab',
  'vision_embed',
  'vision_mlp',
  'vision_heads',
  'patch',
  'norm',
  'layers',
  None,
}


def _n_params(model):
  return sum(int(np.prod(v.shape)) for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable))


@pytest.mark.parametrize(
  'name,count',
  [('3b', 3_754_622_976), ('7b', 8_292_166_656), ('32b', 33_452_718_336), ('72b', 73_410_777_344)],
)
def test_release_presets_have_released_sizes(name, count):
  """Parameter counts of the released Qwen2.5-VL-*-Instruct checkpoints (abstract init only)."""
  cfg = get_config(name)
  model = nnx.eval_shape(lambda: Qwen2_5_VL(cfg, rngs=nnx.Rngs(0)))
  assert _n_params(model) == count


def test_tiny_preset_and_overrides():
  cfg = get_config(
    'tiny',
    vocab_size=321,
    image_token_id=7,
    eos_token_id=3,
    tie_word_embeddings=True,
    vision_config={'depth': 3},
  )
  tc, vc = cfg.text_config, cfg.vision_config
  assert (vc.depth, vc.hidden_size, vc.num_heads, vc.intermediate_size, vc.window_size) == (
    3,
    32,
    2,
    64,
    56,
  )
  assert list(vc.fullatt_block_indexes) == [1] and vc.out_hidden_size == tc.hidden_size == 64
  assert (
    tc.num_hidden_layers,
    tc.num_attention_heads,
    tc.num_key_value_heads,
    tc.intermediate_size,
  ) == (2, 4, 2, 128)
  assert (
    tc.rope_parameters['mrope_section'] == [2, 3, 3] and tc.rope_parameters['rope_theta'] == 1e6
  )
  assert (tc.vocab_size, cfg.image_token_id, tc.eos_token_id, cfg.tie_word_embeddings) == (
    321,
    7,
    3,
    True,
  )
  with pytest.raises(ValueError, match='unknown model preset'):
    get_config('huge')
  # DESIGN.md spells presets after the checkpoint family: the same config.
  assert get_config('qwen2_5_vl_7b').to_dict() == get_config('7b').to_dict()


def test_every_param_has_logical_axis_names():
  model = nnx.eval_shape(lambda: Qwen2_5_VL(get_config('small'), rngs=nnx.Rngs(0)))
  n = 0
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Variable):
      names = var.get_metadata().get('out_sharding')
      assert names is not None and len(names) == len(var.shape), path
      assert set(names) <= LOGICAL, (path, names)
      assert len([x for x in names if x]) == len({x for x in names if x}), (
        path,
        names,
      )  # no repeated axis
      n += 1
  assert n > 20
  assert model.layers.q_proj.kernel.get_metadata()['out_sharding'] == ('layers', 'embed', 'heads')
  assert model.embed_tokens.get_metadata()['out_sharding'] == ('vocab', 'embed')


def test_remat_gives_same_gradients():
  # With an image, so both scans (ViT blocks and decoder layers) are rematerialised.
  cfg = get_config('tiny', vocab_size=testing.VOCAB, image_token_id=testing.IMAGE)
  inp = testing.make_inputs([[(1, 4, 4)]], [(2, 2)], np.random.default_rng(0))
  grid = inp['image_grid_thw']
  pos, _ = get_rope_index(inp['input_ids'], inp['attention_mask'], grid, cfg)

  def loss(m):
    return jnp.mean(m(inp['input_ids'], inp['attention_mask'], inp['pixel_values'], grid, pos) ** 2)

  grads = nnx.jit(lambda m: nnx.grad(loss)(m))
  g = grads(Qwen2_5_VL(cfg, rngs=nnx.Rngs(0)))
  for mode in ('full', 'dots'):
    g_remat = grads(Qwen2_5_VL(cfg, rngs=nnx.Rngs(0), remat=mode))
    for a, b in zip(jax.tree.leaves(g_remat), jax.tree.leaves(g)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  with pytest.raises(ValueError, match="model.remat='some'"):
    Qwen2_5_VL(cfg, rngs=nnx.Rngs(0), remat='some')


def test_bf16_compute():
  cfg = get_config('tiny', vocab_size=testing.VOCAB, image_token_id=testing.IMAGE)
  inp = testing.make_inputs([[(1, 4, 4)]], [(2, 2)], np.random.default_rng(0))
  grid = inp['image_grid_thw']
  pos, _ = get_rope_index(inp['input_ids'], inp['attention_mask'], grid, cfg)
  fwd = nnx.jit(
    lambda m: m(inp['input_ids'], inp['attention_mask'], inp['pixel_values'], grid, pos)
  )
  out32 = np.asarray(fwd(Qwen2_5_VL(cfg, rngs=nnx.Rngs(0))))
  outbf = fwd(Qwen2_5_VL(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))  # fp32 params, bf16 compute
  assert outbf.dtype == jnp.bfloat16
  assert np.abs(np.asarray(outbf, np.float32) - out32).max() < 0.05
