"""Mesh construction and logical-axis -> mesh-axis mapping (multi-device via XLA_FLAGS)."""

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from cpo_jax import sharding


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
