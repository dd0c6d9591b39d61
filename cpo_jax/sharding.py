"""Device mesh and logical-axis sharding (DESIGN.md, Scale).

Parameters carry logical axis names ('embed', 'mlp', ...) as Flax variable metadata; a
rules table maps each name to a mesh axis. A dimension that the mesh axis does not divide
stays replicated, so a tiny model runs unchanged on a large simulated mesh.
"""

import math

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


def logical_to_spec(names, shape, mesh, rules=DEFAULT_RULES):
  """Maps logical axis names of an array of `shape` to a PartitionSpec on `mesh`."""
  table = dict(rules)
  used, spec = set(), []
  for name, dim in zip(names or (), shape):
    axes = table.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    # Each mesh axis shards at most one dimension, and only one it divides.
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0:
      used.update(axes)
      spec.append(axes[0] if len(axes) == 1 else axes)
    else:
      spec.append(None)
  return P(*spec)


def state_shardings(state, mesh, rules=DEFAULT_RULES):
  """NamedShardings for an nnx.State from each Variable's logical axis names.

  Returned in the same tree structure (each Variable holding its sharding), so the result
  works for device_put and jit, and mirrors into optimizer states.
  """

  def one(var):
    meta = var.get_metadata()
    names = meta.get('out_sharding') or meta.get('sharding_names')
    return var.replace(NamedSharding(mesh, logical_to_spec(names, var.shape, mesh, rules)))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh):
  """Leading (batch) dimension over the data-parallel axes, the rest replicated."""
  return NamedSharding(mesh, P(('data', 'fsdp')))


def global_batch(batch, mesh):
  """This process's rows of a batch -> global arrays sharded by `batch_sharding` (on a pod
  every host feeds its own rows, first padded to the step's common length; one process:
  the same as device_put)."""
  sh = batch_sharding(mesh)
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
