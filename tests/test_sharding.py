"""Mesh construction and logical-axis -> mesh-axis mapping (multi-device via XLA_FLAGS)."""

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from cpo_jax import models
from cpo_jax import sharding
from cpo_jax.models import lora


def test_one_device_mesh_shards_nothing():
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, devices=jax.devices()[:1])
  # A 1-device mesh shards nothing, whatever the names.
  assert sharding.logical_to_spec(('embed', 'mlp'), (64, 128), mesh) == P(None, None)


def test_make_mesh_errors():
  with pytest.raises(ValueError, match='At most one'):
    sharding.make_mesh({'data': -1, 'fsdp': -1, 'tensor': 1})
  with pytest.raises(ValueError, match='needs 3 devices'):
    sharding.make_mesh({'data': 3, 'fsdp': 1, 'tensor': 1}, devices=jax.devices()[:2])


@pytest.mark.skipif(
  jax.device_count() < 8, reason='needs XLA_FLAGS=--xla_force_host_platform_device_count=8'
)
def test_eight_device_mesh_and_state_shardings():
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': -1})
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert sharding.logical_to_spec(('embed', 'mlp'), (64, 128), mesh) == P('fsdp', 'tensor')
  # 3 is not divisible by 2: replicated rather than an XLA error.
  assert sharding.logical_to_spec(('embed', 'vocab'), (64, 3), mesh) == P('fsdp', None)
  # One mesh axis shards at most one dimension.
  assert sharding.logical_to_spec(('mlp', 'heads'), (8, 8), mesh) == P('tensor', None)

  class Tiny(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.ones((8, 4)), out_sharding=('embed', 'mlp'), eager_sharding=False)
      self.b = nnx.Param(jnp.ones((4,)))

  state = nnx.state(Tiny())
  placed = jax.device_put(state, sharding.state_shardings(state, mesh))
  assert placed['w'].get_value().sharding.spec == P('fsdp', 'tensor')
  assert placed['b'].get_value().sharding.is_fully_replicated


def _sequence_batch(length):
  rng = np.random.default_rng(0)
  return {
    'input_ids': rng.integers(1, 9, (2, length)),
    'attention_mask': np.ones((2, length), np.int32),
    'chosen_loss_mask': np.ones((2, length), np.int32),
    'chosen_position_ids': rng.integers(1, 9, (2, 3, length)),
    'pixel_values': rng.normal(size=(8, 6)),
    'source': np.array([0, 1]),
  }


def test_pad_to_common_length_is_a_no_op_on_one_process():
  batch = _sequence_batch(5)
  assert sharding.pad_to_common_length(batch) is batch


def test_pad_to_common_length_right_pads_to_the_longest_host(monkeypatch):
  # Two hosts faked: this one cut its batch to 5 columns, the other to 7.
  sent = []
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(
    sharding.multihost_utils,
    'process_allgather',
    lambda x: sent.append(int(x)) or np.array([5, 7], np.int32),
  )
  batch = _sequence_batch(5)
  out = sharding.pad_to_common_length(batch)
  assert sent == [5]
  for k in ('input_ids', 'attention_mask', 'chosen_loss_mask', 'chosen_position_ids'):
    assert out[k].shape == batch[k].shape[:-1] + (7,), k
    np.testing.assert_array_equal(out[k][..., :5], batch[k])
    assert not out[k][..., 5:].any(), k
  assert out['pixel_values'] is batch['pixel_values'] and out['source'] is batch['source']
  # The longest host pads nothing.
  monkeypatch.setattr(
    sharding.multihost_utils, 'process_allgather', lambda x: np.array([7, 5], np.int32)
  )
  np.testing.assert_array_equal(
    sharding.pad_to_common_length(out)['chosen_position_ids'], out['chosen_position_ids']
  )


@pytest.mark.skipif(
  jax.device_count() < 8, reason='needs XLA_FLAGS=--xla_force_host_platform_device_count=8'
)
def test_init_sharded_builds_each_parameter_in_its_sharding():
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  make = lambda: models.Qwen2_5_VL(models.get_config('tiny'), rngs=nnx.Rngs(3))
  model = sharding.init_sharded(make, mesh)
  state = nnx.state(model)
  want = sharding.state_shardings(state, mesh)
  split = 0
  for (path, var), (_, sh) in zip(nnx.to_flat_state(state), nnx.to_flat_state(want)):
    value = var.get_value()
    assert value.sharding.spec == sh.get_value().spec, path
    if not value.sharding.is_fully_replicated:
      split += 1  # no device holds the whole parameter
      assert all(s.data.size < value.size for s in value.addressable_shards), path
  assert split > 10
  # The same values as the same init jitted without shardings.
  plain = jax.jit(lambda: nnx.split(make())[1])()
  for (path, a), (_, b) in zip(nnx.to_flat_state(state), nnx.to_flat_state(plain)):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), path)


@pytest.mark.skipif(
  jax.device_count() < 8, reason='needs XLA_FLAGS=--xla_force_host_platform_device_count=8'
)
def test_attention_heads_split_whole_or_the_mesh_is_an_error():
  # tiny: 4 attention heads and 2 key/value heads of 16 (text), 2 heads of 16 (vision).
  make = lambda: models.Qwen2_5_VL(models.get_config('tiny'), rngs=nnx.Rngs(0))
  state = nnx.state(nnx.eval_shape(make))
  ok = sharding.state_shardings(state, sharding.make_mesh({'data': 4, 'fsdp': 1, 'tensor': 2}))
  assert ok['layers']['k_proj']['kernel'].get_value().spec == P(None, None, 'tensor')
  assert ok['layers']['o_proj']['kernel'].get_value().spec == P(None, 'tensor', None)
  # tensor=4 divides k_proj's 32 columns but not its 2 heads: no head is ever cut in two.
  with pytest.raises(
    ValueError, match=r'layers/k_proj/(kernel|bias): dimension . .* holds 2 heads of 16'
  ):
    sharding.state_shardings(state, sharding.make_mesh({'data': 2, 'fsdp': 1, 'tensor': 4}))
  # The same holds for LoRA adapters, which copy their kernel's head blocks.
  model = make()
  lora.apply_lora(model, rank=2, alpha=4.0, rngs=nnx.Rngs(1))
  b = nnx.state(model, lora.LoRAParam)['layers']['k_proj']['lora_b']
  assert b.get_metadata()['shard_blocks'] == (1, 1, 16)


@pytest.mark.skipif(
  jax.device_count() < 8, reason='needs XLA_FLAGS=--xla_force_host_platform_device_count=8'
)
def test_parameters_left_replicated_are_reported_with_their_bytes(caplog):
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})

  class Odd(nnx.Module):
    def __init__(self):
      self.even = nnx.Param(jnp.ones((8, 4)), out_sharding=('embed', 'mlp'), eager_sharding=False)
      self.odd = nnx.Param(jnp.ones((8, 3)), out_sharding=('embed', 'vocab'), eager_sharding=False)

  with caplog.at_level('WARNING'):
    out = sharding.state_shardings(nnx.state(Odd()), mesh)
  assert out['odd'].get_value().spec == P('fsdp', None)
  (record,) = [r for r in caplog.records if 'stay replicated' in r.getMessage()]
  message = record.getMessage()
  assert '1 parameter(s)' in message and 'odd' in message and 'even' not in message
