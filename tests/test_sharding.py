"""Mesh construction and logical-axis -> mesh-axis mapping (multi-device via XLA_FLAGS)."""
import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

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


@pytest.mark.skipif(jax.device_count() < 8, reason='needs XLA_FLAGS=--xla_force_host_platform_device_count=8')
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
