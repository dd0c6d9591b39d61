"""The training half of bench/peers.py: our CPO++ step against TRL's DPOTrainer + PEFT.

Owns the batch both sides train on (`ours_batch`: TRL's collated batch as our raw batch), our
compiled step (`OurStep`), TRL's trainer as a user sets it up (`make_trainer`), the interleaving
of the two (`Interleave`, `trl_phase`) and the timed comparison with its executed FLOP/s
(`bench_train`, the result's `train` entry). See bench/peers.py's docstring for the settings.
"""

import os
import statistics
import time

import bench_step  # model_flops: the same yardstick
import datasets
from flax import nnx
import jax
import numpy as np
import peers_common
import peft
import torch
import transformers
import trl

from cpo_jax import sharding
from cpo_jax.models import hf_io
from cpo_jax.models import lora
from cpo_jax.train import completion
from cpo_jax.train import objectives
from cpo_jax.train import optimizer
from cpo_jax.train import pair_images
from cpo_jax.train import shared_prefix as shared_prefix_lib
from cpo_jax.train import stages
from cpo_jax.train import steps


def ours_batch(collated, n, n_patches):
  """TRL's collated batch (chosen rows, then rejected rows) -> our step's raw batch."""
  ids = collated['input_ids'].numpy().astype(np.int32)
  am = collated['attention_mask'].numpy().astype(np.int32)
  cm = collated['completion_mask'].numpy().astype(np.int32)
  pv = collated['pixel_values'].numpy().astype(np.float32)
  raw = {}
  for i, side in enumerate(('chosen_', 'rejected_')):
    rows = slice(i * n, (i + 1) * n)
    raw[side + 'input_ids'] = ids[rows]
    raw[side + 'attention_mask'] = am[rows]
    raw[side + 'loss_mask'] = cm[rows]
    raw[side + 'pixel_values'] = pv[i * n * n_patches : (i + 1) * n * n_patches]
  raw.update(
    image_grid_thw=collated['image_grid_thw'].numpy()[:n].astype(np.int32),
    source=np.zeros(n, np.int32),  # thinking pairs
    sample_weight=np.ones(n, np.float32),
  )
  return raw


MIX_LAYOUT = (1, 2)  # data.pair_layout='grouped', data.thinking_fraction=0.5 (pair_layout_for)


def default_mix_batch(raw, n, n_patches):
  """The default batch layout of the same size and shapes: in every group of 2 pairs the first
  stays a thinking pair, the second becomes a perception pair (source 1) whose rejected image
  is its chosen image with the first half of its patches blanked, so its image and prompt are
  not shared: it runs as two full rows, its rejected image encoded apart."""
  if n % MIX_LAYOUT[1]:
    return None
  mix = dict(raw, source=raw['source'].copy())
  mix['source'][1 :: MIX_LAYOUT[1]] = 1
  rejected = pair_images.per_row(raw['chosen_pixel_values'].copy(), n)
  rejected[1 :: MIX_LAYOUT[1], : n_patches // 2] = 0.0
  mix['rejected_pixel_values'] = rejected.reshape(raw['rejected_pixel_values'].shape)
  return mix


class OurStep:
  """Our default CPO++ step, compiled, on a batch resident on the device."""

  def __init__(
    self, model, config, raw, grid, cfg, opt, total_steps, shared_prefix=None, layout=(1, 1)
  ):
    lora.apply_lora(model, rank=8, alpha=32.0, rngs=nnx.Rngs(1))
    prepared = stages.step_inputs(
      raw, grid, config, ('chosen_', 'rejected_'), extra=('source', 'sample_weight')
    )
    mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
    graphdef, trainable, frozen = steps.split_model(model, 'lora')
    tx, schedule = optimizer.make_optimizer(opt, total_steps)
    # The grouped pair layout (t, g) (all thinking pairs: (1, 1); the default half-thinking
    # mix: (1, 2)) and, as a user sets data.max_prompt_len / max_completion_len from
    # --mode=inspect, the shared-prefix step for the thinking pairs.
    kw = dict(vision_score_bytes=stages.vision_score_bytes())  # as the CLI's step
    if shared_prefix:
      p_len, s_len = shared_prefix
      kw.update(pair_layout=layout, max_prompt_len=p_len, max_completion_len=s_len)
      pair_images.check_pair_layout(raw, layout)
      shared_prefix_lib.check_prefix_fits(raw, layout, p_len)
    loss_fn = lambda m, b: objectives.cpo_loss_fn(m, b, grid, cfg, **kw)
    stage = steps.Stage('cpo_plus', graphdef, trainable, frozen, loss_fn, tx, schedule)
    step, (trainable, frozen, opt_state, data) = bench_step.placed_step(stage, mesh, prepared)
    t = time.perf_counter()
    self.compiled = step.lower(trainable, frozen, opt_state, data).compile()
    self.compile_s = time.perf_counter() - t
    cost = self.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    self.xla_flops = float(cost.get('flops', float('nan'))) if cost else None
    self.state = [trainable, frozen, opt_state, data]
    self.times, self.metrics = [], []

  def __call__(self):
    t = time.perf_counter()
    s = self.state
    s[0], s[2], metrics = self.compiled(*s)
    jax.block_until_ready(metrics)
    self.times.append(time.perf_counter() - t)
    if not self.metrics:
      self.metrics.append({k: float(v) for k, v in metrics.items() if np.ndim(v) == 0})
    return self.times[-1]


class Interleave(transformers.TrainerCallback):
  """Runs one step of ours after each TRL step; TRL's step = the time outside ours."""

  def __init__(self, ours):
    self.ours, self.trl_times, self.logs, self.t_resume = ours, [], [], None

  def on_train_begin(self, args, state, control, **kw):
    self.t_resume = time.perf_counter()

  def on_step_end(self, args, state, control, **kw):
    self.trl_times.append(time.perf_counter() - self.t_resume)
    self.ours()
    self.t_resume = time.perf_counter()

  def on_log(self, args, state, control, logs=None, **kw):
    self.logs.append(dict(logs or {}))


def make_trainer(a, processor, base_dir, dataset, max_steps, gradient_checkpointing):
  """TRL's DPOTrainer + PEFT on a fresh transformers model from `base_dir`, as a user sets it
  up (see the module docstring for the settings)."""
  hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
    base_dir, dtype=torch.float32
  )
  cfg, opt = bench_step.step_configs(a.rpo_alpha)  # the same settings as our step's
  args = trl.DPOConfig(
    output_dir=os.path.join(base_dir, f'trl_gc{int(gradient_checkpointing)}'),
    per_device_train_batch_size=a.pairs,
    max_steps=max_steps,
    learning_rate=opt.lr,
    adam_beta1=opt.b1,
    adam_beta2=opt.b2,
    weight_decay=opt.weight_decay,
    max_grad_norm=opt.grad_clip,
    beta=cfg.beta,
    loss_type=['sigmoid', 'sft'],
    loss_weights=[1.0, a.rpo_alpha],
    bf16=False,
    gradient_checkpointing=gradient_checkpointing,
    train_sampling_strategy='sequential',
    logging_steps=1,
    save_strategy='no',
    report_to='none',
    use_cpu=True,
    dataloader_num_workers=0,
    disable_tqdm=True,
    seed=0,
  )
  peft_config = peft.LoraConfig(
    r=8,
    lora_alpha=32,
    lora_dropout=0.0,
    target_modules=peers_common.LLM_LINEAR,
    task_type='CAUSAL_LM',
  )
  t = time.perf_counter()
  trainer = trl.DPOTrainer(
    model=hf,
    args=args,
    train_dataset=dataset,
    processing_class=processor,
    peft_config=peft_config,
  )
  return trainer, time.perf_counter() - t


def trl_phase(trainer, ours, warmup, others=()):
  """trainer.train() with our step (then each of `others`) after each of its steps: (TRL step
  seconds, ours, TRL's logs, [each of others' seconds]), the first `warmup` steps of each left
  out."""
  steps = (ours, *others)
  cb = Interleave(lambda: [s() for s in steps])
  trainer.add_callback(cb)
  starts = [len(s.times) for s in steps]
  trainer.train()
  times = [s.times[start + warmup :] for s, start in zip(steps, starts)]
  return cb.trl_times[warmup:], times[0], cb.logs, times[1:]


def bench_train(a, tok, processor, config, base_dir, peak):
  n, grid = a.pairs, np.asarray([1, a.image_size // 14, a.image_size // 14])
  n_patches = int(np.prod(grid))
  total, total_gc = a.warmup + a.steps, (a.warmup + a.trl_gc_steps) if a.trl_gc_steps else 0
  rows = peers_common.make_rows(
    tok,
    np.random.default_rng(0),
    n,
    image_side=a.image_size,
    question_words=a.question_words,
    completion_len=a.completion_len,
  )
  # Every step sees the same n pairs (sequential sampler over n x steps rows).
  dataset = datasets.Dataset.from_list(rows * max(total, total_gc))
  trainer, trl_setup_s = make_trainer(a, processor, base_dir, dataset, total, False)
  lora_modules = sum(
    1 for name, _ in trainer.model.named_modules() if name.endswith('lora_A.default')
  )

  # The batch TRL's collator makes from the dataset's first n rows: ours gets the same arrays.
  collated = trainer.data_collator([dataset[i] for i in range(n)])
  collate_times = []
  for _ in range(3):
    t = time.perf_counter()
    trainer.data_collator([dataset[i] for i in range(n)])  # row decode (PNG) + processing
    collate_times.append(time.perf_counter() - t)
  seq_len = int(collated['input_ids'].shape[1])
  comp = collated['completion_mask'].sum(1).tolist()
  prompt_len = seq_len - a.completion_len
  if comp != [a.completion_len] * (2 * n):
    raise ValueError(f'completion tokens per row {comp}, expected {a.completion_len}')
  raw = ours_batch(collated, n, n_patches)

  cfg, opt = bench_step.step_configs(a.rpo_alpha)
  model = hf_io.load_hf(base_dir)
  print('ours: compiling the step', flush=True)
  shared = None if a.no_shared_prefix else (prompt_len, a.completion_len)
  ours = OurStep(model, config, raw, grid, cfg, opt, 1 + total + total_gc, shared)
  print(f'ours: compiled in {ours.compile_s:.1f} s', flush=True)
  ours()  # warm-up, alone: its metrics are the first step's
  mix_raw = default_mix_batch(raw, n, n_patches)
  mix = None
  if mix_raw is not None:  # the default half-thinking, half-perception batch, timed beside
    mix = OurStep(
      hf_io.load_hf(base_dir), config, mix_raw, grid, cfg, opt, 1 + total, shared, MIX_LAYOUT
    )
    print(f'ours, default mix batch: compiled in {mix.compile_s:.1f} s', flush=True)
    mix()

  print(f'TRL (same work) and ours: {total} steps each, first {a.warmup} warm-up', flush=True)
  trl_s, ours_s, logs, mix_s = trl_phase(trainer, ours, a.warmup, (mix,) if mix else ())
  del trainer

  flops_trl, parts = bench_step.model_flops(model, config, n, seq_len, grid)
  slab = a.completion_len if shared else completion.completion_positions(seq_len, grid, model)
  flops_ours = bench_step.model_flops(
    model, config, n, seq_len, grid, vit_encodes=1, head_positions=slab, shared_prefix=shared
  )[0]
  ours_med, trl_med = statistics.median(ours_s), statistics.median(trl_s)
  first_trl = next(g for g in logs if 'loss' in g)
  first_ours = ours.metrics[0]
  out = dict(
    batch=dict(
      pairs=n,
      kind='thinking (chosen and rejected share the image)',
      image_size=a.image_size,
      image_tokens=n_patches // 4,
      prompt_tokens=prompt_len,
      prompt_text_tokens=prompt_len - n_patches // 4,
      completion_tokens=a.completion_len,
      seq_len=seq_len,
    ),
    ours_shared_prefix=dict(prefix_tokens=shared[0], continuation_tokens=shared[1])
    if shared
    else None,
    steps_timed=len(trl_s),
    warmup_steps=a.warmup,
    speedup_vs_trl=trl_med / ours_med,
    ours_step_s_median=ours_med,
    trl_step_s_median=trl_med,
    ours_step_s_all=ours_s,
    trl_step_s_all=trl_s,
    ours_step_s_alone_warmup=ours.times[0],
    trl_collate_s_median=statistics.median(collate_times),
    trl_collate_note='dataset row fetch (PNG decode) + DataCollatorForVisionPreference for one '
    'batch, timed apart; it is part of every TRL step above',
    ours_compile_s=ours.compile_s,
    trl_setup_s=trl_setup_s,
    executed_gflops_per_s=dict(
      ours=flops_ours / ours_med / 1e9,
      trl=flops_trl / trl_med / 1e9,
      method='formula (bench_step.model_flops): TRL = peer-style count (2 ViT encodes, '
      'full-vocabulary head at every position, policy forward+backward + reference forward); '
      'ours = the same with 1 ViT encode and the head over the completion slab',
    ),
    executed_flops_per_step=dict(ours=flops_ours, trl=flops_trl),
    executed_over_jax_f32_peak=dict(
      ours=flops_ours / ours_med / 1e9 / peak['jax_f32'],
      trl=flops_trl / trl_med / 1e9 / peak['jax_f32'],
    ),
    executed_over_torch_f32_peak=dict(
      ours=flops_ours / ours_med / 1e9 / peak['torch_f32'],
      trl=flops_trl / trl_med / 1e9 / peak['torch_f32'],
    ),
    model_flops_parts=parts,
    ours_xla_cost_analysis_flops=ours.xla_flops,
    ours_xla_cost_analysis_note='XLA cost_analysis() of the compiled step: counts a scanned '
    "(stacked) layer's body once, so far below the formula",
    same_function=dict(
      first_step_loss=dict(ours=first_ours['loss'], trl=first_trl['loss']),
      first_step_logps_chosen=dict(
        ours=first_ours['logps/chosen'], trl=first_trl.get('logps/chosen')
      ),
      first_step_logps_rejected=dict(
        ours=first_ours['logps/rejected'], trl=first_trl.get('logps/rejected')
      ),
    ),
    trl_setup=dict(
      lora_modules=lora_modules,
      target_modules=peers_common.LLM_LINEAR,
      bf16=False,
      gradient_checkpointing=False,
      loss_type=['sigmoid', 'sft'],
      loss_weights=[1.0, a.rpo_alpha],
      logging_steps=1,
    ),
    trl_gradient_checkpointing=None,
  )
  if mix:
    mix_med = statistics.median(mix_s[0])
    out.update(
      ours_default_mix_step_s_median=mix_med,
      ours_default_mix_step_s_all=mix_s[0],
      ours_default_mix_vs_trl_thinking_batch=trl_med / mix_med,
      default_mix_batch=dict(
        pairs=n,
        pair_layout=list(MIX_LAYOUT),
        kind="data.pair_layout='grouped', data.thinking_fraction=0.5: per group of 2 pairs, 1 "
        'thinking pair (shared prefix) + 1 perception pair (its rejected image differs: two '
        'full rows, two image encodes); same token ids, image size and lengths as the batch above',
        note='NOT the same batch as TRL\'s (2 thinking pairs): the ratio is TRL\'s step on its '
        'batch over ours on this one, interleaved in the same run',
      ),
    )
  if total_gc:
    # TRL's default: gradient checkpointing, i.e. the policy's decoder forward runs again in
    # the backward (more work than ours does; counted in its executed FLOPs).
    trainer, _ = make_trainer(a, processor, base_dir, dataset, total_gc, True)
    print(f'TRL (its default checkpointing) and ours: {total_gc} steps each', flush=True)
    gc_s, gc_ours_s, _, _ = trl_phase(trainer, ours, a.warmup)
    del trainer
    gc_med, gc_ours_med = statistics.median(gc_s), statistics.median(gc_ours_s)
    out['trl_gradient_checkpointing'] = dict(
      steps_timed=len(gc_s),
      speedup_vs_trl=gc_med / gc_ours_med,
      ours_step_s_median=gc_ours_med,
      trl_step_s_median=gc_med,
      ours_step_s_all=gc_ours_s,
      trl_step_s_all=gc_s,
      trl_executed_gflops_per_s=(flops_trl + parts['llm_forward']) / gc_med / 1e9,
      note="TRL's default gradient_checkpointing=True (still fp32): the same step plus a "
      'recomputed policy LLM forward; ours unchanged, interleaved again',
    )
  return out
