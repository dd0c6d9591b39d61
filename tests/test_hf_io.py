"""load_hf / save_hf: round trips through transformers, sharding, dtypes, errors, memory."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip('torch')

from flax import nnx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: E402

from cpo_jax.models import get_rope_index  # noqa: E402
from cpo_jax.models import hf_io  # noqa: E402
from cpo_jax.models import load_hf  # noqa: E402
from cpo_jax.models import save_hf  # noqa: E402
from cpo_jax.models import testing  # noqa: E402


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  cfg = testing.tiny_hf_config(layers=2, depth=2, tied=False)
  torch.manual_seed(0)
  tmodel = testing.randomize_torch_model(Qwen2_5_VLForConditionalGeneration(cfg).eval())
  path = str(tmp_path_factory.mktemp('hf'))
  tmodel.save_pretrained(path)
  return path, tmodel


@pytest.fixture(scope='module')
def inputs():
  return testing.make_inputs([[(1, 4, 4)], [(1, 4, 4)]], [(2, 3), (1, 1)], np.random.default_rng(0))


def _torch_logits(tmodel, inp):
  mm = (inp['input_ids'] == testing.IMAGE).astype(np.int64)
  with torch.no_grad():
    return (
      tmodel(
        input_ids=torch.tensor(inp['input_ids']),
        attention_mask=torch.tensor(inp['attention_mask']),
        pixel_values=torch.tensor(inp['pixel_values']),
        image_grid_thw=torch.tensor(inp['image_grid_thw']),
        mm_token_type_ids=torch.tensor(mm),
      )
      .logits.float()
      .numpy()
    )


def _state(model):
  return {
    '/'.join(map(str, k)): np.asarray(v[...])
    for k, v in nnx.iter_graph(model)
    if isinstance(v, nnx.Variable)
  }


def _files(path):
  return {
    n: open(os.path.join(path, n), 'rb').read()
    for n in os.listdir(path)
    if n.endswith('.safetensors')
  }


@pytest.mark.parametrize('shard_bytes', [None, 60_000])
def test_save_hf_loads_back_into_transformers(hf_dir, inputs, tmp_path, shard_bytes):
  path, tmodel = hf_dir
  model = load_hf(path)
  out = str(tmp_path / 'export')
  save_hf(model, out, **({'max_shard_bytes': shard_bytes} if shard_bytes else {}))
  sharded = os.path.exists(os.path.join(out, 'model.safetensors.index.json'))
  assert sharded == (shard_bytes is not None)
  if sharded:
    assert len(json.load(open(os.path.join(out, 'model.safetensors.index.json')))['weight_map']) > 1
    assert len([n for n in os.listdir(out) if n.endswith('.safetensors')]) > 1
  back = Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()
  for name, p in tmodel.state_dict().items():  # bit-exact weights
    np.testing.assert_array_equal(back.state_dict()[name].numpy(), p.numpy(), err_msg=name)
  np.testing.assert_array_equal(_torch_logits(back, inputs), _torch_logits(tmodel, inputs))
  # and our own loader reads the export (sharded or not) to the same params
  again = _state(load_hf(out))
  for k, v in _state(model).items():
    np.testing.assert_array_equal(again[k], v, err_msg=k)


def test_bf16_checkpoint(hf_dir, inputs, tmp_path):
  path, tmodel = hf_dir
  bf = str(tmp_path / 'bf16')
  Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).save_pretrained(bf)
  model = load_hf(bf, dtype=jnp.bfloat16)
  state = _state(model)
  assert all(v.dtype == jnp.bfloat16 for v in state.values())
  out = str(tmp_path / 'bf16_export')
  save_hf(model, out)
  assert _files(out) == _files(bf) or all(  # byte-identical tensors, maybe in another order
    np.array_equal(
      hf_io.SafetensorsReader(os.path.join(out, 'model.safetensors')).read(n).view(np.uint16),
      hf_io.SafetensorsReader(os.path.join(bf, 'model.safetensors')).read(n).view(np.uint16),
    )
    for n in hf_io.SafetensorsReader(os.path.join(bf, 'model.safetensors')).keys()
  )
  pos, _ = get_rope_index(
    inputs['input_ids'], inputs['attention_mask'], inputs['image_grid_thw'], model.config
  )
  grid = inputs['image_grid_thw']
  got = nnx.jit(lambda m, ids, mask, pix, pos: m(ids, mask, pix, grid, pos))(
    model, inputs['input_ids'], inputs['attention_mask'], inputs['pixel_values'], pos
  )
  got = np.asarray(got).astype(np.float32)
  want = _torch_logits(tmodel, inputs)
  valid = inputs['attention_mask'].astype(bool)
  assert np.abs(got - want)[valid].max() < 0.15  # bf16 weights and compute vs fp32


def _rewrite(src, dst, edit_tensors=None, edit_config=None):
  os.makedirs(dst, exist_ok=True)
  cfg = json.load(open(os.path.join(src, 'config.json')))
  if edit_config:
    edit_config(cfg)
  json.dump(cfg, open(os.path.join(dst, 'config.json'), 'w'))
  r = hf_io.SafetensorsReader(os.path.join(src, 'model.safetensors'))
  tensors = {n: r.read(n) for n in r.keys()}
  if edit_tensors:
    edit_tensors(tensors)
  hf_io.write_safetensors(
    os.path.join(dst, 'model.safetensors'),
    [(n, a.dtype, a.shape, lambda a=a: a) for n, a in tensors.items()],
  )
  return dst


def test_clear_errors(hf_dir, tmp_path):
  path, _ = hf_dir
  name = 'model.layers.1.self_attn.k_proj.weight'
  bad = _rewrite(path, str(tmp_path / 'missing'), edit_tensors=lambda t: t.pop(name))
  with pytest.raises(KeyError, match=name.replace('.', r'\.')):
    load_hf(bad)
  bad = _rewrite(
    path,
    str(tmp_path / 'unexpected'),
    edit_tensors=lambda t: t.__setitem__('model.layers.0.extra.weight', np.zeros(3, np.float32)),
  )
  with pytest.raises(ValueError, match=r'model\.layers\.0\.extra\.weight'):
    load_hf(bad)
  bad = _rewrite(
    path,
    str(tmp_path / 'shape'),
    edit_tensors=lambda t: t.__setitem__(
      'visual.blocks.0.attn.proj.weight', np.zeros((32, 31), np.float32)
    ),
  )
  with pytest.raises(
    ValueError, match=r'shape mismatch for tensor .visual\.blocks\.0\.attn\.proj\.weight'
  ):
    load_hf(bad)
  bad = _rewrite(
    path,
    str(tmp_path / 'arch'),
    edit_config=lambda c: c.update(
      model_type='qwen2_vl', architectures=['Qwen2VLForConditionalGeneration']
    ),
  )
  with pytest.raises(ValueError, match='unsupported architecture'):
    load_hf(bad)
  os.makedirs(tmp_path / 'pickle')
  _rewrite(path, str(tmp_path / 'pickle'))
  os.replace(tmp_path / 'pickle' / 'model.safetensors', tmp_path / 'pickle' / 'pytorch_model.bin')
  with pytest.raises(ValueError, match='safetensors only'):
    load_hf(str(tmp_path / 'pickle'))


def test_loader_memory_is_bounded(hf_dir, tmp_path):
  """Peak host RSS while loading stays well under twice the model's bytes (~200 MB model)."""
  path = str(tmp_path / 'big')
  cfg = testing.tiny_hf_config(
    hidden=512,
    heads=8,
    kv_heads=2,
    intermediate=1536,
    layers=10,
    vocab=8192,
    tied=False,
    mrope=(8, 12, 12),
  )
  with torch.device('meta'):
    meta = Qwen2_5_VLForConditionalGeneration(cfg)
  n_bytes = sum(p.numel() for p in meta.parameters()) * 4
  assert n_bytes > 150e6
  # write the checkpoint tensor by tensor (random values) without building the torch model
  shapes = {hf_io.canonical_name(k): tuple(v.shape) for k, v in meta.state_dict().items()}
  hf_io.write_safetensors(
    os.path.join(path + '.st'),
    [(n, np.float32, s, lambda s=s: np.full(s, 0.01, np.float32)) for n, s in shapes.items()],
  )
  os.makedirs(path)
  os.replace(path + '.st', os.path.join(path, 'model.safetensors'))
  cfg.save_pretrained(path)
  script = textwrap.dedent(f'''
      import jax, jax.numpy as jnp
      from cpo_jax.models import load_hf
      def peak():  # VmHWM: this process's peak resident set (kB)
        return int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) * 1024
      load_hf({hf_dir[0]!r})  # warm up: imports, transformers config machinery
      before = peak()
      model = load_hf({path!r})
      print((peak() - before) / {n_bytes})
  ''')
  out = subprocess.run(
    [sys.executable, '-c', script],
    capture_output=True,
    text=True,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  ratio = float(out.stdout.strip().splitlines()[-1])
  print(f'peak RSS growth while loading = {ratio:.2f} x model bytes')
  # model bytes + transient copies of the largest tensor + fixed compile/trace overhead
  assert ratio < 1.6, ratio
