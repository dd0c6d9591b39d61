"""Hugging Face checkpoint import/export for Qwen2.5-VL (safetensors only).

Reads directories written by transformers' `save_pretrained` (single file or sharded with
`model.safetensors.index.json`; both the on-disk names `visual.*` / `model.layers.*` and
the in-memory v5 names `model.visual.*` / `model.language_model.*` are accepted).
Loading is streamed: the model is built abstractly (no random init), and each parameter
is assembled from its tensor(s) read lazily from the memory-mapped files, placed (on its
sharding if given) and freed before the next one, so host memory stays near one copy.
"""

from __future__ import annotations

import json
import os
from typing import Callable

from flax import nnx
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from cpo_jax import paths
from cpo_jax.models import lora as lora_lib
from cpo_jax.models.qwen2_5_vl import Qwen2_5_VL

ARCHITECTURE = 'Qwen2_5_VLForConditionalGeneration'
MODEL_TYPE = 'qwen2_5_vl'

# (model path without the stack index, HF name template with {i} for the layer index, kind)
# kind: 'linear' (torch [out, in] -> kernel [in, out]), 'copy', 'patch' (Conv3d -> [C*T*P*P, E]).
_VISION_BLOCK = [
  (('norm1', 'weight'), 'norm1.weight', 'copy'),
  (('norm2', 'weight'), 'norm2.weight', 'copy'),
  (('qkv', 'kernel'), 'attn.qkv.weight', 'linear'),
  (('qkv', 'bias'), 'attn.qkv.bias', 'copy'),
  (('proj', 'kernel'), 'attn.proj.weight', 'linear'),
  (('proj', 'bias'), 'attn.proj.bias', 'copy'),
  (('gate_proj', 'kernel'), 'mlp.gate_proj.weight', 'linear'),
  (('gate_proj', 'bias'), 'mlp.gate_proj.bias', 'copy'),
  (('up_proj', 'kernel'), 'mlp.up_proj.weight', 'linear'),
  (('up_proj', 'bias'), 'mlp.up_proj.bias', 'copy'),
  (('down_proj', 'kernel'), 'mlp.down_proj.weight', 'linear'),
  (('down_proj', 'bias'), 'mlp.down_proj.bias', 'copy'),
]
_DECODER_LAYER = [
  (('input_layernorm', 'weight'), 'input_layernorm.weight', 'copy'),
  (('post_attention_layernorm', 'weight'), 'post_attention_layernorm.weight', 'copy'),
  (('q_proj', 'kernel'), 'self_attn.q_proj.weight', 'linear'),
  (('q_proj', 'bias'), 'self_attn.q_proj.bias', 'copy'),
  (('k_proj', 'kernel'), 'self_attn.k_proj.weight', 'linear'),
  (('k_proj', 'bias'), 'self_attn.k_proj.bias', 'copy'),
  (('v_proj', 'kernel'), 'self_attn.v_proj.weight', 'linear'),
  (('v_proj', 'bias'), 'self_attn.v_proj.bias', 'copy'),
  (('o_proj', 'kernel'), 'self_attn.o_proj.weight', 'linear'),
  (('gate_proj', 'kernel'), 'mlp.gate_proj.weight', 'linear'),
  (('up_proj', 'kernel'), 'mlp.up_proj.weight', 'linear'),
  (('down_proj', 'kernel'), 'mlp.down_proj.weight', 'linear'),
]


def weight_map(config) -> dict[tuple, tuple[list[str], str]]:
  """Model param path -> (HF tensor names (one per stacked layer, else one), kind)."""
  out = {
    ('visual', 'patch_embed', 'kernel'): (['visual.patch_embed.proj.weight'], 'patch'),
    ('visual', 'merger', 'ln_q', 'weight'): (['visual.merger.ln_q.weight'], 'copy'),
    ('visual', 'merger', 'fc1', 'kernel'): (['visual.merger.mlp.0.weight'], 'linear'),
    ('visual', 'merger', 'fc1', 'bias'): (['visual.merger.mlp.0.bias'], 'copy'),
    ('visual', 'merger', 'fc2', 'kernel'): (['visual.merger.mlp.2.weight'], 'linear'),
    ('visual', 'merger', 'fc2', 'bias'): (['visual.merger.mlp.2.bias'], 'copy'),
    ('embed_tokens',): (['model.embed_tokens.weight'], 'copy'),
    ('norm', 'weight'): (['model.norm.weight'], 'copy'),
  }
  if not config.tie_word_embeddings:
    out[('lm_head', 'kernel')] = (['lm_head.weight'], 'linear')
  depth, n_layers = config.vision_config.depth, config.text_config.num_hidden_layers
  for sub, name, kind in _VISION_BLOCK:
    out[('visual', 'blocks') + sub] = ([f'visual.blocks.{i}.{name}' for i in range(depth)], kind)
  for sub, name, kind in _DECODER_LAYER:
    out[('layers',) + sub] = ([f'model.layers.{i}.{name}' for i in range(n_layers)], kind)
  return out


def canonical_name(name: str) -> str:
  """transformers v5 in-memory names -> on-disk (v4) names."""
  if name.startswith('model.visual.'):
    return name[len('model.') :]
  if name.startswith('model.language_model.'):
    return 'model.' + name[len('model.language_model.') :]
  return name


def _to_model(arr, kind, target_shape, name):
  if kind == 'linear':
    arr = arr.T
  elif kind == 'patch':
    arr = arr.reshape(arr.shape[0], -1).T
  if tuple(arr.shape) != tuple(target_shape):
    raise ValueError(
      f'shape mismatch for tensor {name!r}: checkpoint gives {tuple(arr.shape)} after layout '
      f'conversion ({kind}), model expects {tuple(target_shape)}'
    )
  return arr


def _from_model(arr, kind, config):
  if kind == 'linear':
    return arr.T
  if kind == 'patch':
    vc = config.vision_config
    return arr.T.reshape(
      arr.shape[1], vc.in_channels, vc.temporal_patch_size, vc.patch_size, vc.patch_size
    )
  return arr


def read_config(path):
  from transformers import Qwen2_5_VLConfig

  cfg_file = paths.path(path) / 'config.json'
  if not cfg_file.exists():
    raise FileNotFoundError(
      f'{cfg_file} not found: expected a directory written by save_pretrained'
    )
  raw = json.loads(cfg_file.read_text())
  archs = raw.get('architectures') or []
  if raw.get('model_type') != MODEL_TYPE or (archs and ARCHITECTURE not in archs):
    raise ValueError(
      f'unsupported architecture in {cfg_file}: model_type={raw.get("model_type")!r}, '
      f'architectures={archs}; only {ARCHITECTURE} ({MODEL_TYPE}) is supported'
    )
  return Qwen2_5_VLConfig.from_dict(raw)


_DTYPES = {
  'F64': np.float64,
  'F32': np.float32,
  'F16': np.float16,
  'BF16': jnp.bfloat16,
  'I64': np.int64,
  'I32': np.int32,
  'I16': np.int16,
  'I8': np.int8,
  'U8': np.uint8,
  'BOOL': np.bool_,
}


class SafetensorsReader:
  """Reads single tensors of a .safetensors file with plain file reads (no mmap), so a tensor
  costs exactly its own bytes of host memory and nothing stays resident after use. On gs:// each
  read is a ranged read of that tensor's bytes: nothing is downloaded whole."""

  def __init__(self, filename):
    self.filename = paths.path(filename)
    with self.filename.open('rb') as f:
      n = int.from_bytes(f.read(8), 'little')
      header = json.loads(f.read(n))
    self.data_start = 8 + n
    header.pop('__metadata__', None)
    self.header = header

  def keys(self):
    return self.header.keys()

  def shape(self, name):
    return tuple(self.header[name]['shape'])

  def read(self, name):
    info = self.header[name]
    if info['dtype'] not in _DTYPES:
      raise ValueError(f'tensor {name!r} in {self.filename} has unsupported dtype {info["dtype"]}')
    arr = np.empty(info['shape'], _DTYPES[info['dtype']])
    begin, end = info['data_offsets']
    if arr.nbytes != end - begin:
      raise ValueError(f'tensor {name!r} in {self.filename}: header size mismatch')
    with self.filename.open('rb') as f:
      f.seek(self.data_start + begin)
      f.readinto(memoryview(arr.reshape(-1).view(np.uint8)))
    return arr


def _open_checkpoint(path):
  """({file: reader}, {canonical tensor name: (file, original name)}) for single or sharded files."""
  path = paths.path(path)
  index = path / 'model.safetensors.index.json'
  if index.exists():
    files = sorted(set(json.loads(index.read_text())['weight_map'].values()))
  elif (path / 'model.safetensors').exists():
    files = ['model.safetensors']
  else:
    if any(p.name.endswith(('.bin', '.pt', '.pth', '.ckpt')) for p in path.iterdir()):
      raise ValueError(
        f'{path} holds only pickle-based weights; cpo_jax reads safetensors only '
        '(convert with transformers: model.save_pretrained(dir, safe_serialization=True))'
      )
    raise FileNotFoundError(f'no model.safetensors or model.safetensors.index.json in {path}')
  readers, where = {}, {}
  for fn in files:
    readers[fn] = SafetensorsReader(path / fn)
    for name in readers[fn].keys():
      where[canonical_name(name)] = (fn, name)
  return readers, where


def load_hf(
  path,
  dtype=jnp.float32,
  param_dtype=None,
  sharding_for: Callable[..., jax.sharding.Sharding | None] | None = None,
  remat: str = 'none',
  attention_chunk: int = 0,
) -> Qwen2_5_VL:
  """Loads a transformers Qwen2.5-VL directory. Params are stored in param_dtype (default dtype).

  sharding_for(logical_names, shape, blocks) may return a Sharding to place each param on as
  it is read (`sharding.sharding_for_params(mesh)`); the host then holds one tensor at a time.
  """
  config = read_config(path)
  param_dtype = param_dtype or dtype
  model = nnx.eval_shape(
    lambda: Qwen2_5_VL(
      config,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=nnx.Rngs(0),
      remat=remat,
      attention_chunk=attention_chunk,
    )
  )
  readers, where = _open_checkpoint(path)
  wmap = weight_map(config)
  used = set()
  for mpath, var in nnx.iter_graph(model):
    if not isinstance(var, nnx.Variable):
      continue
    mpath = tuple(str(p) for p in mpath)
    if mpath not in wmap:
      raise ValueError(
        f'model parameter {"/".join(mpath)} has no checkpoint mapping (internal error)'
      )
    names, kind = wmap[mpath]
    for n in names:
      if n not in where:
        raise KeyError(f'missing tensor {n!r} in checkpoint {path} (needed for {"/".join(mpath)})')
    names_meta = var.get_metadata().get('out_sharding')
    shape = tuple(var.shape)
    blocks = var.get_metadata().get('shard_blocks')
    sharding = (
      sharding_for(tuple(names_meta), shape, blocks) if (sharding_for and names_meta) else None
    )
    if _is_stacked(mpath):
      # fill the stacked array layer by layer in place (donated), never a second full copy
      zeros = lambda: jnp.zeros(shape, param_dtype)  # noqa: B023 (called at once)
      value = jax.jit(zeros, out_shardings=sharding)()
      for i, n in enumerate(names):
        fn, orig = where[n]
        layer = _to_model(readers[fn].read(orig), kind, shape[1:], n)
        value = _set_layer(value, jnp.asarray(layer, param_dtype), i)
        del layer
    else:
      fn, orig = where[names[0]]
      host = np.ascontiguousarray(
        _to_model(readers[fn].read(orig), kind, shape, names[0]), dtype=param_dtype
      )
      value = jax.device_put(host, sharding) if sharding is not None else jnp.asarray(host)
      del host
    used.update(names)
    var.set_value(value)
  unexpected = sorted(set(where) - used - _ignorable(config))
  if unexpected:
    raise ValueError(
      f'unexpected tensor(s) in checkpoint {path}: {unexpected[:10]}'
      f'{" ..." if len(unexpected) > 10 else ""} (not part of {ARCHITECTURE} with this config)'
    )
  return model


def _set_layer_impl(stack, layer, i):
  return jax.lax.dynamic_update_index_in_dim(stack, layer, i, 0)


_set_layer = jax.jit(_set_layer_impl, donate_argnums=0)


def _ignorable(config):
  # A tied checkpoint may still carry a copy of the embedding as lm_head.weight.
  return {'lm_head.weight'} if config.tie_word_embeddings else set()


_DTYPE_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def _hf_shape(shape, kind, config):
  if kind == 'linear':
    return tuple(shape[::-1])
  if kind == 'patch':
    vc = config.vision_config
    return (shape[1], vc.in_channels, vc.temporal_patch_size, vc.patch_size, vc.patch_size)
  return tuple(shape)


def write_safetensors(filename, entries, metadata=None):
  """Streams tensors to a .safetensors file. entries: [(name, dtype, shape, fetch)], where
  fetch() returns the array only when it is written (one tensor in host memory at a time)."""
  header, offset = {}, 0
  for name, dtype, shape, _ in entries:
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    header[name] = {
      'dtype': _DTYPE_NAMES[np.dtype(dtype)],
      'shape': list(shape),
      'data_offsets': [offset, offset + nbytes],
    }
    offset += nbytes
  if metadata:
    header['__metadata__'] = metadata
  blob = json.dumps(header, separators=(',', ':')).encode()
  blob += b' ' * (-len(blob) % 8)
  with open(filename, 'wb') as f:
    f.write(len(blob).to_bytes(8, 'little'))
    f.write(blob)
    for name, dtype, shape, fetch in entries:
      arr = np.ascontiguousarray(fetch(), dtype=dtype)
      if arr.shape != tuple(shape):
        raise ValueError(f'tensor {name!r}: got shape {arr.shape}, header says {tuple(shape)}')
      f.write(memoryview(arr.reshape(-1).view(np.uint8)))


def save_hf(model: Qwen2_5_VL, path, max_shard_bytes: int = 5 * 1024**3, dtype=None):
  """Writes config.json + safetensors (sharded with an index above max_shard_bytes) that
  transformers loads with Qwen2_5_VLForConditionalGeneration.from_pretrained. Tensors are
  streamed one at a time. LoRA adapters, if present, are merged into the written weights as
  each is written (no merged copy of the model). dtype: storage dtype (default: the params').
  With several processes every one must call it (parameters are gathered tensor by tensor);
  only process 0 writes, to a local `path`."""
  writer = jax.process_index() == 0
  config = model.config
  adapted = {  # kernel path -> its Linear, where adapters are on
    tuple(str(p) for p in k) + ('kernel',): m
    for k, m in nnx.iter_graph(model)
    if getattr(m, 'lora_a', None) is not None
  }
  if writer:
    os.makedirs(path, exist_ok=True)
  params = {
    tuple(str(p) for p in k): v for k, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)
  }
  entries = []
  for mpath, (names, kind) in weight_map(config).items():
    var = params[mpath]
    store = np.dtype(dtype or var[...].dtype)
    per_layer = var.shape[1:] if _is_stacked(mpath) else var.shape
    for i, n in enumerate(names):

      def fetch(var=var, i=i, kind=kind, stacked=_is_stacked(mpath), lin=adapted.get(mpath)):  # noqa: B008 (bound now)
        layer = (lambda x: x[i]) if stacked else (lambda x: x)
        value = layer(var[...])
        if lin is not None:
          a, b = layer(lin.lora_a[...]), layer(lin.lora_b[...])
          value = lora_lib.merged_kernel(value, a, b, lin.lora_scale)
        return _from_model(_to_host(value), kind, config)

      entries.append((n, store, _hf_shape(per_layer, kind, config), fetch))
  shards, cur, cur_bytes = [], [], 0
  for e in entries:
    nbytes = int(np.prod(e[2], dtype=np.int64)) * e[1].itemsize
    if cur and cur_bytes + nbytes > max_shard_bytes:
      shards.append(cur)
      cur, cur_bytes = [], 0
    cur.append(e)
    cur_bytes += nbytes
  shards.append(cur)
  if not writer:  # the gathers are collectives: run them with process 0, write nothing
    for shard in shards:
      for e in shard:
        e[3]()
    return
  for old in os.listdir(path):  # stale weights from an earlier save would shadow the new ones
    if old.startswith('model') and old.endswith(('.safetensors', '.safetensors.index.json')):
      os.remove(os.path.join(path, old))
  saved = config.architectures
  config.architectures = [ARCHITECTURE]
  config.save_pretrained(path)
  config.architectures = saved
  if len(shards) == 1:
    write_safetensors(os.path.join(path, 'model.safetensors'), shards[0], {'format': 'pt'})
    return
  weight_index = {}
  for j, shard in enumerate(shards):
    fn = f'model-{j + 1:05d}-of-{len(shards):05d}.safetensors'
    write_safetensors(os.path.join(path, fn), shard, {'format': 'pt'})
    weight_index.update({e[0]: fn for e in shard})
  total = sum(os.path.getsize(os.path.join(path, f)) for f in set(weight_index.values()))
  with open(os.path.join(path, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_index}, f, indent=2)


def _to_host(value) -> np.ndarray:
  """The whole array on this host. Parameters sharded across processes (a pod) are gathered:
  a collective, so every process runs save_hf (process 0 alone writes the files)."""
  if isinstance(value, jax.Array) and not value.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(value, tiled=True))
  return np.asarray(jax.device_get(value))


def _is_stacked(mpath):
  return mpath[0] == 'layers' or mpath[:2] == ('visual', 'blocks')
