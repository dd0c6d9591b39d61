"""LoRA: zero-init B is the base model, adapters off is the base model, merge equals adapted."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpo_jax.models import Qwen2_5_VL
from cpo_jax.models import get_config
from cpo_jax.models import get_rope_index
from cpo_jax.models import load_hf
from cpo_jax.models import save_hf
from cpo_jax.models import testing
from cpo_jax.models.lora import LoRAParam
from cpo_jax.models.lora import adapters_disabled
from cpo_jax.models.lora import apply_lora
from cpo_jax.models.lora import lora_state
from cpo_jax.models.lora import merge_lora

CFG = get_config(
  'tiny',
  vocab_size=testing.VOCAB,
  image_token_id=testing.IMAGE,
  vision_start_token_id=testing.VSTART,
  vision_end_token_id=testing.VEND,
)
INP = testing.make_inputs([[(1, 4, 4)], [(1, 4, 4)]], [(2, 3), (1, 1)], np.random.default_rng(0))
POS, _ = get_rope_index(INP['input_ids'], INP['attention_mask'], INP['image_grid_thw'], CFG)
GRID = INP['image_grid_thw']


@nnx.jit
def policy_and_reference(model):
  """What a CPO step computes: policy logits and, adapters off, reference logits."""
  args = (INP['input_ids'], INP['attention_mask'], INP['pixel_values'], GRID, POS)
  with adapters_disabled(model):
    ref = model(*args)
  return model(*args), ref


@nnx.jit
def logits(model):
  return model(INP['input_ids'], INP['attention_mask'], INP['pixel_values'], GRID, POS)


def _set_adapters(model, seed):
  for i, (_, var) in enumerate(nnx.iter_graph(model)):
    if isinstance(var, LoRAParam):
      var[...] = 0.05 * jax.random.normal(jax.random.key(seed + i), var.shape, var[...].dtype)


@pytest.fixture(scope='module')
def base():
  model = Qwen2_5_VL(CFG, rngs=nnx.Rngs(0))
  return model, np.asarray(logits(model))


def test_zero_b_adapters_off_merge_and_export(base, tmp_path):
  model, want = base
  model = nnx.clone(model)
  targets = (
    'q_proj',
    'k_proj',
    'v_proj',
    'o_proj',
    'gate_proj',
    'up_proj',
    'down_proj',
    'qkv',
    'proj',
  )
  paths = apply_lora(model, rank=4, alpha=8, targets=targets, include_vision=True, rngs=nnx.Rngs(1))
  assert {p.split('/')[-1] for p in paths} == set(targets)
  assert any(p.startswith('visual') for p in paths)
  pol, ref = policy_and_reference(model)
  np.testing.assert_array_equal(np.asarray(pol), want)  # B = 0: exactly the base model
  np.testing.assert_array_equal(np.asarray(ref), want)
  _set_adapters(model, 7)  # as after training
  pol, ref = policy_and_reference(model)
  adapted = np.asarray(pol)
  assert np.abs(adapted - want).max() > 1e-2
  np.testing.assert_array_equal(np.asarray(ref), want)  # adapters off: still exactly the base
  assert all(m.lora_enabled for _, m in nnx.iter_graph(model) if hasattr(m, 'lora_enabled'))
  # merge: a model without adapters computing the adapted function
  merged = merge_lora(model)
  assert not jax.tree.leaves(lora_state(merged))
  assert jax.tree.leaves(lora_state(model))  # the source model keeps its adapters
  np.testing.assert_allclose(np.asarray(logits(merged)), adapted, atol=2e-5)
  # export merges too: the written weights are the merged ones
  save_hf(model, str(tmp_path))
  loaded = {
    k: np.asarray(v[...])
    for k, v in nnx.iter_graph(load_hf(str(tmp_path)))
    if isinstance(v, nnx.Variable)
  }
  for k, v in nnx.iter_graph(merged):
    if isinstance(v, nnx.Variable):
      np.testing.assert_array_equal(loaded[k], np.asarray(v[...]), err_msg=str(k))
  # In place (after SFT: no second copy of the model), the same merged weights.
  in_place = merge_lora(nnx.clone(model), copy=False)
  for (k, a), (_, b) in zip(
    nnx.to_flat_state(nnx.state(in_place)), nnx.to_flat_state(nnx.state(merged))
  ):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), str(k))


def test_only_adapters_get_gradients(base):
  model, _ = base
  model = nnx.clone(model)
  apply_lora(model, rank=4, alpha=8, rngs=nnx.Rngs(3))

  def loss(m):  # text only: keeps the compiled program small
    return jnp.mean(m(INP['input_ids'][:, -4:]) ** 2)

  grads = nnx.grad(loss, argnums=nnx.DiffState(0, LoRAParam))(model)
  flat = {'/'.join(map(str, k)): v for k, v in nnx.to_flat_state(grads)}
  assert flat and all(k.endswith(('lora_a', 'lora_b')) for k in flat)
  # with B = 0 only B receives gradient (standard LoRA start)
  assert all(np.abs(np.asarray(v[...])).max() == 0 for k, v in flat.items() if k.endswith('lora_a'))
  assert any(np.abs(np.asarray(v[...])).max() > 0 for k, v in flat.items() if k.endswith('lora_b'))
  # stacked layers get stacked adapters with the layer axis named for sharding
  q = model.layers.q_proj
  assert q.lora_a.shape == (CFG.text_config.num_hidden_layers, 64, 4)
  assert q.lora_a.get_metadata()['out_sharding'] == ('layers', 'embed', None)
  assert q.lora_b.get_metadata()['out_sharding'] == ('layers', None, 'heads')


def test_errors(base):
  model = nnx.clone(base[0])
  with pytest.raises(ValueError, match='no Linear layer matched'):
    apply_lora(model, rank=2, alpha=2, targets=('nope',), rngs=nnx.Rngs(0))
  apply_lora(model, rank=2, alpha=2, targets=('q_proj',), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='already has a LoRA adapter'):
    apply_lora(model, rank=2, alpha=2, targets=('q_proj',), rngs=nnx.Rngs(0))


def test_dropout_train_vs_eval(base):
  model = nnx.clone(base[0])
  apply_lora(model, rank=4, alpha=8, dropout=0.5, rngs=nnx.Rngs(4))
  _set_adapters(model, 5)
  ids = INP['input_ids'][:, -4:]  # text only: small program
  fwd = nnx.jit(lambda m: m(ids))
  a, b = np.asarray(fwd(model)), np.asarray(fwd(model))
  assert np.abs(a - b).max() > 1e-4  # fresh masks on every training call
  assert int(model.layers.q_proj.lora_count[...][0]) == 2
  model.eval()
  c, d = np.asarray(fwd(model)), np.asarray(fwd(model))
  np.testing.assert_array_equal(c, d)
  no_dropout = nnx.clone(model)
  for _, m in nnx.iter_graph(no_dropout):
    if getattr(m, 'lora_dropout', 0.0):
      m.lora_dropout = 0.0
  np.testing.assert_allclose(c, np.asarray(fwd(no_dropout)), atol=1e-6)
  model.train()
  assert np.abs(np.asarray(fwd(model)) - c).max() > 1e-4
