"""`--mode=plan`: compile the real train step ahead of time and report memory per device.

Nothing is allocated: the model, the optimizer state and the batch are abstract
(`jax.ShapeDtypeStruct`), so a 72B preset on a simulated 256-device mesh
(`XLA_FLAGS=--xla_force_host_platform_device_count=256`) can be sized on a laptop.
"""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from cpo_jax import models
from cpo_jax import sharding
from cpo_jax.data import datasets
from cpo_jax.data import processors
from cpo_jax.models import hf_io
from cpo_jax.train import accumulation
from cpo_jax.train import device_pairs
from cpo_jax.train import objectives
from cpo_jax.train import optimizer
from cpo_jax.train import stages
from cpo_jax.train import steps

PATCH_DIM = 3 * 2 * 14 * 14  # channels x temporal patch x patch x patch (Qwen2.5-VL).


# HBM per chip of the TPU generations a run is sized for (GiB).
TPU_HBM_GIB = {'v4': 32, 'v5e': 16, 'v5p': 95, 'v6e': 32}


def _model_config(cfg):
  """The preset's config, or with model.init_from the checkpoint's (config.json only)."""
  if cfg.model.init_from:
    return hf_io.read_config(cfg.model.init_from)
  return models.get_config(cfg.model.preset)


def _build(cfg):
  return models.Qwen2_5_VL(
    _model_config(cfg),
    dtype=getattr(jnp, cfg.model.dtype),
    param_dtype=getattr(jnp, cfg.model.param_dtype),
    rngs=nnx.Rngs(0),
    remat=cfg.model.remat,
    attention_chunk=cfg.model.attention_chunk,
  )


def _abstract_batch(cfg, stage, grid, num_perturbations=0):
  """A batch of the pipeline's static shapes (see cpo_jax/data/datasets.py), with what the
  CPO++ config adds: evidence boxes for device-made pairs, streamed reference log-probs."""
  batch = cfg.sft.batch_size if stage == 'sft' else cfg.cpo.batch_size
  length = cfg.data.max_len
  patches = int(np.prod(grid))
  if patches // 4 >= length:
    raise ValueError(f'data.max_len={length} cannot hold {patches // 4} image tokens.')
  seq = lambda dtype=jnp.int32: jax.ShapeDtypeStruct((batch, length), dtype)
  side = {
    'input_ids': seq(),
    'attention_mask': seq(),
    'loss_mask': seq(),
    'pixel_values': jax.ShapeDtypeStruct((batch * patches, PATCH_DIM), jnp.float32),
    'position_ids': jax.ShapeDtypeStruct((batch, 3, length), jnp.int32),
  }
  if stage == 'sft':
    return side
  out = {f'{p}{k}': v for p in ('chosen_', 'rejected_') for k, v in side.items()}
  out['source'] = jax.ShapeDtypeStruct((batch,), jnp.int32)
  out['sample_weight'] = jax.ShapeDtypeStruct((batch,), jnp.float32)
  if objectives.weighs_answers(cfg.cpo.answer_weight):
    for key in objectives.ANSWER_START_KEYS:
      out[key] = jax.ShapeDtypeStruct((batch,), jnp.int32)
  if num_perturbations:
    out['boxes'] = jax.ShapeDtypeStruct((batch, 1, 4), jnp.float32)
  if cfg.cpo.reference == 'precomputed':
    out['reference_logps'] = jax.ShapeDtypeStruct((batch, 2 + num_perturbations), jnp.float32)
  return out


def plan(cfg, stage='cpo_plus'):
  """Compiles `stage`'s train step for the configured preset and mesh; returns a summary."""
  mesh = sharding.make_mesh(cfg.mesh.shape)
  cfg = stages.resolve_accumulation(cfg, mesh)
  side = processors.static_image_side(cfg.data.image_size) // 14  # patches per side
  grid = np.array([1, side, side])
  num_perturbations = len(device_pairs.parse_device_perturbations(cfg.cpo.device_perturbations))
  pair_layout = None
  if stage == 'sft':
    adapted = nnx.eval_shape(lambda: stages.sft_model(_build(cfg), cfg))
    stage_obj = stages.sft_stage(adapted, cfg, grid)[0]
  else:
    adapted = nnx.eval_shape(lambda: stages.attach_adapters(_build(cfg), cfg))
    if cfg.data.pair_layout == 'grouped':  # as for pipeline-made pairs
      pair_layout = datasets.pair_layout_for(cfg.data.thinking_fraction, cfg.cpo.batch_size)
    # One vision attention block, as the accelerator being sized takes it.
    stage_obj = stages.cpo_stage(adapted, cfg, grid, pair_layout=pair_layout, score_bytes=None)[0]
  trainable, frozen, tx = stage_obj.trainable, stage_obj.frozen, stage_obj.tx
  trainable_sh = sharding.state_shardings(trainable, mesh)
  frozen_sh = sharding.state_shardings(frozen, mesh)
  opt_state = jax.eval_shape(tx.init, trainable)
  opt_sh = optimizer.opt_state_shardings(tx, trainable, trainable_sh, mesh)
  step = steps.make_train_step(stage_obj, mesh, (trainable_sh, frozen_sh, opt_sh))
  batch = _abstract_batch(cfg, stage, grid, num_perturbations if stage != 'sft' else 0)
  if stage_obj.accumulation is not None:  # the step takes its micro-batches
    steps_ = stage_obj.accumulation.steps
    rows = cfg.sft.batch_size if stage == 'sft' else cfg.cpo.batch_size
    accumulation.check_micro_rows(rows, steps_, mesh)
    batch = {
      k: jax.ShapeDtypeStruct(accumulation.micro_shape(v.shape, steps_), v.dtype)
      for k, v in batch.items()
    }
  compiled = step.lower(trainable, frozen, opt_state, batch).compile()
  memory = compiled.memory_analysis()
  nbytes = lambda tree: int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))
  per_device = (
    memory.argument_size_in_bytes
    + memory.output_size_in_bytes
    + memory.temp_size_in_bytes
    - memory.alias_size_in_bytes
  )
  return {
    'preset': f'init_from:{cfg.model.init_from}' if cfg.model.init_from else cfg.model.preset,
    'stage': stage,
    'mesh': {k: int(v) for k, v in mesh.shape.items()},
    'devices': int(mesh.devices.size),
    'bytes_per_device': int(per_device),
    'argument_bytes_per_device': int(memory.argument_size_in_bytes),
    'temp_bytes_per_device': int(memory.temp_size_in_bytes),
    'param_bytes_total': nbytes(trainable) + nbytes(frozen),
    'trainable_bytes_total': nbytes(trainable),
    'batch': {k: list(v.shape) for k, v in batch.items() if k.endswith('input_ids')},
    'grad_accum_steps': stage_obj.accumulation.steps if stage_obj.accumulation else 1,
    'remat': cfg.model.remat,
    'attention_chunk': int(cfg.model.attention_chunk),  # query rows per attention block
    'work_per_step': _work(cfg, stage, num_perturbations, pair_layout),
    # XLA's own count of what the step holds per device; leave headroom for the runtime.
    'fits_tpu': [t for t, gib in TPU_HBM_GIB.items() if per_device <= gib * 2**30],
  }


def _work(cfg, stage, k, pair_layout):
  """What one step computes, in sequences and images (the rows `cpo_loss_fn` forwards)."""
  if stage == 'sft':
    n = cfg.sft.batch_size
    return {'policy_sequences': n, 'reference_sequences': 0, 'images_encoded': n}
  n = cfg.cpo.batch_size
  t, g = pair_layout or (0, 1)
  rows = (2 + k) * n  # chosen, rejected, and k device-made rejected sides per pair
  images = n + n * (g - t) // g + k * n
  encodes = 1 if not cfg.lora.include_vision else 2  # a ViT with adapters: per model
  reference = 0 if cfg.cpo.reference == 'precomputed' else rows
  return {
    'policy_sequences': rows,
    'reference_sequences': reference,
    'images_encoded': images * (encodes if reference else 1),
  }
