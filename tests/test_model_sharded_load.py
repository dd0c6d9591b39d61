"""load_hf places each parameter straight onto the sharding its logical names map to."""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip('torch')

SCRIPT = textwrap.dedent('''
    import os, sys, tempfile
    os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from flax import nnx
    from transformers import Qwen2_5_VLForConditionalGeneration
    from cpo_jax.models import testing, load_hf, get_rope_index
    cfg = testing.tiny_hf_config(layers=1, depth=1)
    d = tempfile.mkdtemp()
    Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(d)
    mesh = Mesh(np.array(jax.devices()), ('fsdp',))
    rules = {'embed': 'fsdp', 'vision_embed': 'fsdp'}
    model = load_hf(d, sharding_for=lambda names, shape, blocks: NamedSharding(mesh, P(*[rules.get(n) for n in names])))
    assert len(jax.devices()) == 2
    assert model.layers.q_proj.kernel[...].sharding.spec == P(None, 'fsdp', None)
    assert model.embed_tokens[...].sharding.spec == P(None, 'fsdp')
    assert model.visual.blocks.qkv.kernel[...].sharding.spec == P(None, 'fsdp', None)
    inp = testing.make_inputs([[(1, 4, 4)], [(1, 4, 4)]], [(2, 3), (1, 1)], np.random.default_rng(0))
    pos, _ = get_rope_index(inp['input_ids'], inp['attention_mask'], inp['image_grid_thw'], cfg)
    g = inp['image_grid_thw']
    fwd = nnx.jit(lambda m: m(inp['input_ids'], inp['attention_mask'], inp['pixel_values'], g, pos))
    diff = np.abs(np.asarray(fwd(model)) - np.asarray(fwd(load_hf(d)))).max()
    assert diff < 1e-5, diff
    print('ok')
''')


def test_load_onto_shardings():
  out = subprocess.run(
    [sys.executable, '-c', SCRIPT],
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  assert out.returncode == 0 and out.stdout.strip().endswith('ok'), out.stderr[-3000:]
