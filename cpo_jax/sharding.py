"""Device mesh and logical-axis sharding (DESIGN.md, Scale).

Parameters carry logical axis names ('embed', 'mlp', ...) as Flax variable metadata; a
rules table maps each name to a mesh axis. A dimension that the mesh axis does not divide
stays replicated (a tiny model runs unchanged on a large simulated mesh), and the
parameters this happens to are reported with their bytes; attention projections are split
by whole heads only (a mesh that cannot is an error naming the parameter).
"""

import math

from absl import logging
from flax import nnx
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

MESH_AXES = ('data', 'fsdp', 'tensor')

# Logical name -> mesh axis (or tuple of axes, or None = replicated).
DEFAULT_RULES = (
  ('batch', ('data', 'fsdp')),
  ('embed', 'fsdp'),
  ('vision_embed', 'fsdp'),
  ('vocab', 'tensor'),
  ('mlp', 'tensor'),
  ('vision_mlp', 'tensor'),
  ('heads', 'tensor'),
  ('kv_heads', 'tensor'),
  ('vision_heads', 'tensor'),
  ('head_dim', None),
  ('patch', None),
  ('norm', None),
  ('layers', None),
  ('lora_rank', None),
)


def make_mesh(shape, devices=None):
  """Builds a ('data', 'fsdp', 'tensor') mesh from a {axis: size} mapping; -1 = the rest."""
  devices = np.asarray(devices if devices is not None else jax.devices())
  sizes = [int(shape[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f'At most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}.')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if devices.size % known:
      raise ValueError(
        f'{devices.size} devices do not split into mesh {dict(zip(MESH_AXES, sizes))}.'
      )
    sizes[sizes.index(-1)] = devices.size // known
  if math.prod(sizes) != devices.size:
    raise ValueError(
      f'Mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, '
      f'{devices.size} are available.'
    )
  return Mesh(devices.reshape(sizes), MESH_AXES)


def _place(names, shape, mesh, rules, blocks=None):
  """(PartitionSpec, unsplit): `unsplit` lists (dim, logical name, mesh axes, block) that the
  rules shard but the mesh does not divide (in whole blocks), so they stay replicated."""
  table = dict(rules)
  used, spec, unsplit = set(), [], []
  blocks = blocks or (1,) * len(shape)
  for i, (name, dim) in enumerate(zip(names or (), shape)):
    axes = table.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    # Each mesh axis shards at most one dimension, and only one it divides in whole blocks.
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    parts = math.prod(mesh.shape[a] for a in axes)
    if axes and dim % blocks[i] == 0 and (dim // blocks[i]) % parts == 0:
      used.update(axes)
      spec.append(axes[0] if len(axes) == 1 else axes)
    else:
      spec.append(None)
      if axes:
        unsplit.append((i, name, axes, blocks[i]))
  return P(*spec), unsplit


def _check_blocks(what, shape, unsplit, mesh):
  """A dimension of whole blocks (attention heads) that the mesh cannot split is an error."""
  for i, name, axes, block in unsplit:
    if block > 1:
      parts = math.prod(mesh.shape[a] for a in axes)
      raise ValueError(
        f'{what}: dimension {i} ({name!r}) holds {shape[i] // block} heads of {block}, which '
        f'mesh axis {axes} of size {parts} does not divide; choose a mesh.shape.tensor that '
        f'divides the model\'s attention and key/value heads.'
      )


def logical_to_spec(names, shape, mesh, rules=DEFAULT_RULES, blocks=None):
  """Maps logical axis names of an array of `shape` to a PartitionSpec on `mesh`; `blocks`
  (per dim) are sizes a split must not cut. A dimension the mesh does not divide stays
  replicated (`state_shardings` reports it); one of heads is an error."""
  spec, unsplit = _place(names, shape, mesh, rules, blocks)
  _check_blocks(f'array {tuple(names or ())} {tuple(shape)}', shape, unsplit, mesh)
  return spec


def state_shardings(state, mesh, rules=DEFAULT_RULES):
  """NamedShardings for an nnx.State from each Variable's logical axis names.

  Returned in the same tree structure (each Variable holding its sharding), so the result
  works for device_put and jit, and mirrors into optimizer states. Parameters the rules
  would split but the mesh does not divide stay replicated, with one warning that lists
  them and the bytes each device holds in excess; attention heads the mesh cannot split
  whole are an error naming the parameter.
  """
  replicated = []

  def one(path, var):
    meta = var.get_metadata()
    names = meta.get('out_sharding') or meta.get('sharding_names')
    what = '/'.join(str(getattr(k, 'key', k)) for k in path)
    spec, unsplit = _place(names, var.shape, mesh, rules, meta.get('shard_blocks'))
    _check_blocks(what, var.shape, unsplit, mesh)
    if unsplit:
      parts = math.prod(mesh.shape[a] for _, _, axes, _ in unsplit for a in axes)
      nbytes = math.prod(var.shape) * np.dtype(var.dtype).itemsize
      replicated.append((what, nbytes - nbytes // parts))
    return var.replace(NamedSharding(mesh, spec))

  out = jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  if replicated:
    logging.warning(
      'sharding: %d parameter(s) stay replicated where the rules split them, because the '
      'mesh %s does not divide them (%.1f MiB more per device than split): %s',
      len(replicated),
      dict(mesh.shape),
      sum(b for _, b in replicated) / 2**20,
      ', '.join(w for w, _ in replicated[:20]) + (' ...' if len(replicated) > 20 else ''),
    )
  return out


def sharding_for_params(mesh, rules=DEFAULT_RULES):
  """`sharding_for(names, shape, blocks)` as models.load_hf takes it: each parameter read
  straight onto the sharding its logical names map to."""

  def sharding_for(names, shape, blocks=None):
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules, blocks))

  return sharding_for


def init_sharded(make_model, mesh, rules=DEFAULT_RULES):
  """`make_model()` built directly into its shardings: abstract shapes first, then one jitted
  init whose outputs are the parameters already in place. No whole copy of the model ever
  sits on one device or in host memory (a 72B preset on a pod is built like a tiny one)."""
  graphdef, abstract = nnx.split(nnx.eval_shape(make_model))
  shardings = state_shardings(abstract, mesh, rules)
  state = jax.jit(lambda: nnx.split(make_model())[1], out_shardings=shardings)()
  return nnx.merge(graphdef, state)


DATA_AXES = ('data', 'fsdp')  # the mesh axes that split a batch's rows


def rows_over_data(x):
  """Constrains activations [rows, ...] to rows split over the data-parallel axes when the step
  is traced under a mesh (`steps.make_train_step`). Without it XLA may all-gather a layer's
  activations over fsdp (the weights' axis) and every device computes the whole micro-batch.
  Off a mesh, or when the rows do not divide, x as it is (the same values either way)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(DATA_AXES) <= set(mesh.axis_names):
    return x
  parts = math.prod(mesh.shape[a] for a in DATA_AXES)
  if parts == 1 or x.shape[0] % parts:
    return x
  return jax.lax.with_sharding_constraint(x, P(DATA_AXES))


def batch_sharding(mesh, micro=False):
  """Batch rows over the data-parallel axes, the rest replicated; with `micro`, the rows of
  each micro-batch ([steps, rows, ...]: gradient accumulation)."""
  rows = P(('data', 'fsdp'))
  return NamedSharding(mesh, P(None, ('data', 'fsdp')) if micro else rows)


def global_batch(batch, mesh, micro=False):
  """This process's rows of a batch -> global arrays sharded by `batch_sharding` (on a pod
  every host feeds its own rows, first padded to the step's common length; one process:
  the same as device_put)."""
  sh = batch_sharding(mesh, micro)
  batch = pad_to_common_length(batch)
  return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in batch.items()}


# Batch keys with a trailing sequence axis: [B, L] ids and masks, [B, 3, L] position ids.
SEQUENCE_SUFFIXES = ('input_ids', 'attention_mask', 'loss_mask', 'position_ids')


def pad_to_common_length(batch):
  """Right-pads this process's sequence arrays to the longest of the step over all processes.

  Each host cuts its batch to its own length bucket (data.length_buckets), but one global
  array has one shape. Zeros: a pad column has attention 0 and loss 0, and under causal
  attention a later position never changes an earlier one, so the losses are unchanged.
  One tiny collective per call on several processes; on one process the batch as it is."""
  if jax.process_count() == 1:
    return batch
  keys = [k for k in batch if k.endswith(SEQUENCE_SUFFIXES)]
  local = max(batch[k].shape[-1] for k in keys)
  length = int(np.max(multihost_utils.process_allgather(np.int32(local))))
  out = dict(batch)
  for k in keys:
    v = np.asarray(batch[k])
    out[k] = np.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, length - v.shape[-1])])
  return out


def process_rows(x):
  """The rows of a batch-sharded global array that this process holds, in order: the
  inverse of `global_batch` for one array."""
  shards = {s.index[0].start or 0: s.data for s in x.addressable_shards}
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


def replicated(mesh):
  return NamedSharding(mesh, P())
