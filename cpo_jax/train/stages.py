"""The two training stages as the CLI runs them: SFT, then CPO++ on new LoRA adapters.

Each stage is built from the config as a `steps.Stage` plus the host-side `prepare(batch)` that
checks a pipeline batch and adds what the step consumes (M-RoPE position ids), then handed
to `loop.run_stage`.
"""

import functools
import json

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from cpo_jax.data import datasets
from cpo_jax.models import get_rope_index  # host-side numpy, transformers' semantics.
from cpo_jax.models import layers
from cpo_jax.models import lora
from cpo_jax.train import accumulation
from cpo_jax.train import completion
from cpo_jax.train import device_pairs
from cpo_jax.train import early_stop
from cpo_jax.train import loop
from cpo_jax.train import objectives
from cpo_jax.train import optimizer
from cpo_jax.train import pair_images
from cpo_jax.train import shared_prefix
from cpo_jax.train import steps

SEQUENCE_KEYS = ('input_ids', 'attention_mask', 'loss_mask', 'pixel_values')


def step_inputs(batch, grid, model_config, prefixes=('',), extra=()):
  """The arrays a step consumes, plus Qwen2.5-VL's 3D (M-RoPE) position ids computed on
  host as the HF processor would. The image grid is static per run (it shapes the vision
  tower), so a batch with another grid is an error, not a recompile."""
  batch_grid = np.asarray(batch['image_grid_thw'])
  if not (batch_grid == grid).all():
    raise ValueError(
      f'batch image_grid_thw {np.unique(batch_grid, axis=0).tolist()} differs '
      f'from the run grid {grid.tolist()}; all images must share a size.'
    )
  out = {k: batch[k] for k in extra}
  for p in prefixes:
    out.update({p + k: batch[p + k] for k in SEQUENCE_KEYS})
    position_ids, _ = get_rope_index(
      np.asarray(batch[p + 'input_ids']),
      np.asarray(batch[p + 'attention_mask']),
      batch_grid,
      model_config,
    )
    # Stored batch-major [B, 3, L] so the batch sharding splits its leading dimension.
    out[p + 'position_ids'] = np.asarray(position_ids, np.int32).transpose(1, 0, 2)
  return out


SFT_TRAINABLE = ('all', 'lora')


def _check_sft_trainable(cfg):
  if cfg.sft.trainable not in SFT_TRAINABLE:
    raise ValueError(
      f'config.sft.trainable={cfg.sft.trainable!r}; expected one of {SFT_TRAINABLE}.'
    )


def sft_model(model, cfg):
  """The model SFT trains: `model`, or with sft.trainable='lora' (the paper's SFT) `model` with
  new adapters attached in place (`train_sft` merges them into the weights after the stage)."""
  _check_sft_trainable(cfg)
  if cfg.sft.trainable == 'lora':
    _apply_lora(model, cfg, seed=cfg.seed + 2)
  return model


def sft_stage(model, cfg, grid, *, name='sft', hparams=None):
  """Stage 1 (SFT) on the output of `sft_model`: completion-only cross-entropy on
  (image, prompt) -> chain + answer. Returns the Stage and the host-side `prepare(batch)` that
  feeds its step. `name` and `hparams` (num_steps, optimizer, grad_accum_steps; cfg.sft when
  None) let the compute-matched control (`train_sft_more`) train the same objective."""
  _check_sft_trainable(cfg)
  hparams = cfg.sft if hparams is None else hparams
  trains = cfg.sft.trainable if name == 'sft' else 'lora'
  if trains == 'lora' and not jax.tree.leaves(nnx.state(model, lora.LoRAParam)):
    raise ValueError(
      f"stage {name!r} trains LoRA adapters but the model has none: pass it through "
      f"{'sft_model' if name == 'sft' else 'train_sft_more'}."
    )
  tx, schedule = optimizer.make_optimizer(hparams.optimizer, hparams.num_steps)
  graphdef, trainable, frozen = steps.split_model(model, trains)
  max_completion_len = cfg.data.max_completion_len
  stage = steps.Stage(
    name,
    graphdef,
    trainable,
    frozen,
    functools.partial(objectives.sft_loss_fn, grid=grid, max_completion_len=max_completion_len),
    tx,
    schedule,
    accumulation=_accumulation(
      hparams.grad_accum_steps,
      accumulation.sft_accumulation,
      grid=grid,
      max_completion_len=max_completion_len,
    ),
  )

  def prepare(b):
    completion.check_completion_lengths(
      b, completion.completion_positions(b['input_ids'].shape[1], grid, model, max_completion_len)
    )
    return step_inputs(b, grid, model.config)

  return stage, prepare


def resolve_accumulation(cfg, mesh):
  """A copy of `cfg` whose grad_accum_steps=0 (derive from the mesh) are resolved; CPO++
  micro-batches keep the pair layout's groups whole."""
  cfg = cfg.copy_and_resolve_references()
  for stage, group in ((cfg.sft, 1), (cfg.cpo, cpo_pair_group(cfg))):
    if stage.grad_accum_steps == 0:
      stage.grad_accum_steps = accumulation.steps_for_mesh(
        stage.batch_size, stage.micro_batch_per_device, mesh, group
      )
  return cfg


def cpo_pair_group(cfg):
  """Pairs a CPO++ micro-batch keeps together on a host: the grouped layout's group
  (`datasets.pair_layout_for`; given pairs split by cpo_source take it, or groups of 1 when
  they hold one kind only), else 1."""
  if cfg.data.pair_layout != 'grouped':
    return 1
  per_host = cfg.cpo.batch_size // jax.process_count()
  return datasets.pair_layout_for(cfg.data.thinking_fraction, per_host)[1]


def _accumulation(grad_accum_steps, make, **kw):
  """None for one pass per batch, else the stage's `accumulation.Accumulation`."""
  if int(grad_accum_steps) < 1:
    raise ValueError(f'grad_accum_steps={grad_accum_steps}; expected an integer >= 1.')
  return make(int(grad_accum_steps), **kw) if grad_accum_steps > 1 else None


def attach_adapters(model, cfg):
  """Adds new LoRA adapters to the SFT model (in place) for CPO++. Returns the model the
  stage trains: the adapted model (reference = adapters off) or, with
  cpo.reference='frozen_copy', the policy beside a copy of the SFT model taken first."""
  reference = cfg.cpo.reference
  if reference not in objectives.REFERENCE_MODES:
    raise ValueError(
      f'config.cpo.reference={reference!r}; expected one of {objectives.REFERENCE_MODES}.'
    )
  ref_model = nnx.clone(model) if reference == 'frozen_copy' else None
  _apply_lora(model, cfg, seed=cfg.seed + 1)
  return model if ref_model is None else objectives.PolicyAndReference(model, ref_model)


def _apply_lora(model, cfg, *, seed):
  """New adapters as config.lora says (each stage its own: SFT's are merged before CPO++)."""
  lora.apply_lora(
    model,
    rank=cfg.lora.rank,
    alpha=cfg.lora.alpha,
    dropout=cfg.lora.dropout,
    targets=tuple(cfg.lora.targets.split(',')),
    include_vision=cfg.lora.include_vision,
    param_dtype=getattr(jnp, cfg.lora.param_dtype),
    rngs=nnx.Rngs(seed),
  )


def vision_score_bytes():
  """The CPO++ step's vision attention block size: cache-sized blocks of (image or window,
  head) pairs on a CPU backend, as generation takes them (the small model's step: 0.375 ->
  0.341 s); None, one block, on an accelerator and in `--mode=plan`, which sizes one."""
  return layers.CPU_SEGMENT_SCORE_BYTES if jax.default_backend() == 'cpu' else None


def cpo_stage(
  stage_model, cfg, grid, image_processor=None, pair_layout=None, score_bytes='backend'
):
  """Stage 2 (CPO++) on the output of `attach_adapters`: only the adapters train.

  `image_processor`: the run's (for the patch layout of cpo.device_perturbations); None =
  the Qwen2-VL defaults that `processors.make_processors` uses. `pair_layout`: (t, g) when
  the stream groups its pairs (`datasets.pair_layout_for`); checked on every batch.
  `score_bytes`: the vision attention's blocks ('backend': `vision_score_bytes()`)."""
  policy, _ = objectives.policy_and_reference(stage_model)
  tx, schedule = optimizer.make_optimizer(cfg.cpo.optimizer, cfg.cpo.num_steps)
  graphdef, trainable, frozen = steps.split_model(stage_model, 'lora')
  max_completion_len = cfg.data.max_completion_len
  perturbations = device_pairs.parse_device_perturbations(cfg.cpo.device_perturbations)
  extra = ('source', 'sample_weight') + (('boxes',) if perturbations else ())
  if objectives.weighs_answers(cfg.cpo.answer_weight):
    extra += objectives.ANSWER_START_KEYS
  objectives.weighs_end(cfg.cpo.end_token_weight)  # checked before any compile
  kw = dict(
    grid=grid,
    cfg=cfg.cpo,
    max_completion_len=max_completion_len,
    pair_layout=pair_layout,
    max_prompt_len=cfg.data.max_prompt_len,
    shared_prefix_step=cfg.cpo.shared_prefix,
    vision_score_bytes=vision_score_bytes() if score_bytes == 'backend' else score_bytes,
  )
  if perturbations:
    kw.update(
      perturbations=perturbations,
      seed=cfg.seed,
      layout=device_pairs.layout_for(policy.config, image_processor),
    )
  precomputed = cfg.cpo.reference == 'precomputed'
  stage = steps.Stage(
    'cpo_plus',
    graphdef,
    trainable,
    frozen,
    functools.partial(objectives.cpo_loss_fn, **kw),
    tx,
    schedule,
    functools.partial(objectives.reference_logps, **kw) if precomputed else None,
    reference_settings=json.dumps(
      {
        key: cfg.cpo[key]
        for key in ('loss_type', 'answer_weight', 'end_token_weight', 'device_perturbations')
      },
      sort_keys=True,
    ),
    accumulation=_accumulation(cfg.cpo.grad_accum_steps, accumulation.cpo_accumulation, **kw),
  )

  def prepare(b):
    length = b['chosen_input_ids'].shape[1]
    positions = completion.completion_positions(length, grid, policy, max_completion_len)
    completion.check_completion_lengths(b, positions, ('chosen_', 'rejected_'))
    if pair_layout is not None:
      pair_images.check_pair_layout(b, pair_layout)
      sizes = shared_prefix.prefix_sizes(
        length, positions, cfg.data.max_prompt_len, pair_layout, cfg.cpo.shared_prefix
      )
      if sizes:
        shared_prefix.check_prefix_fits(b, pair_layout, sizes[0])
    return step_inputs(b, grid, policy.config, ('chosen_', 'rejected_'), extra=extra)

  return stage, prepare


def _run(stage, prepare, cfg, num_steps, train, policy_of=lambda m: m, **loop_kw):
  evaluate = loop_kw.pop('evaluate', None)
  if evaluate is not None:  # evaluates what the stage returns: the CPO++ policy, not its pair
    loop_kw['evaluate'] = lambda model: evaluate(policy_of(model))
  trainable, frozen = loop.run_stage(
    stage,
    num_steps=num_steps,
    restore_only=not train,
    prepare=prepare,
    checkpoint_cfg=cfg.checkpoint,
    log_every=cfg.log_every_steps,
    **loop_kw,
  )
  return nnx.merge(stage.graphdef, trainable, frozen)


def sft_validation(cfg, make_val_batches, prepare):
  """The SFT stage's `early_stop.Validation` (sft.early_stop='val_loss'), or None.
  `make_val_batches()`: a fresh iterator over the held-out SFT batches (the same each call)."""
  mode = cfg.sft.early_stop
  if mode not in early_stop.MODES:
    raise ValueError(f'config.sft.early_stop={mode!r}; expected one of {early_stop.MODES}.')
  if not mode:
    return None
  if make_val_batches is None:
    raise ValueError(f"sft.early_stop={mode!r} needs held-out batches (make_val_batches).")
  return early_stop.Validation(
    every=cfg.sft.val_every_steps,
    patience=cfg.sft.patience,
    batches=lambda: (prepare(b) for b in make_val_batches()),
  )


def train_sft(model, cfg, *, grid, train=True, make_val_batches=None, **loop_kw):
  """Runs (or resumes, or with train=False restores) the SFT stage; returns the model: with
  sft.early_stop='val_loss', the params of its lowest held-out loss (`early_stop.py`)."""
  stage, prepare = sft_stage(sft_model(model, cfg), cfg, grid)
  validation = sft_validation(cfg, make_val_batches, prepare)
  if validation is not None:
    loop_kw['validation'] = validation
  model = _run(stage, prepare, cfg, cfg.sft.num_steps, train, **loop_kw)
  # In place: the adapters-on SFT model is not needed again, and a second copy may not fit.
  return lora.merge_lora(model, copy=False) if cfg.sft.trainable == 'lora' else model


def train_sft_more(model, cfg, *, grid, train=True, **loop_kw):
  """The compute-matched control of CPO++ (stage `sft_more`): the SFT objective continued on
  new LoRA adapters (initialised as CPO++'s) for cpo.num_steps of cpo.batch_size rows with
  cpo.optimizer, so it differs from the CPO++ stage only in its objective and pairs.
  Runs (or resumes, or restores); returns the model."""
  _apply_lora(model, cfg, seed=cfg.seed + 1)
  stage, prepare = sft_stage(model, cfg, grid, name='sft_more', hparams=cfg.cpo)
  return _run(stage, prepare, cfg, cfg.cpo.num_steps, train, **loop_kw)


def train_cpo(model, cfg, *, grid, train=True, image_processor=None, pair_layout=None, **loop_kw):
  """Runs (or resumes, or with train=False restores) the CPO++ stage; returns the policy."""
  stage, prepare = cpo_stage(attach_adapters(model, cfg), cfg, grid, image_processor, pair_layout)
  policy_of = lambda m: objectives.policy_and_reference(m)[0]
  return policy_of(_run(stage, prepare, cfg, cfg.cpo.num_steps, train, policy_of, **loop_kw))
