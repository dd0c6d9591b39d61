"""Benchmark (not a test): the CPO++ train step, naive vs optimized, same run (BENCHMARKS.md).

naive      what peers do: a separate frozen reference copy, every forward encodes its images from
           pixel_values, logits over the full vocabulary at every position
           (`train.naive.naive_cpo_loss_fn` on a `PolicyAndReference`).
optimized  the default step: reference = adapters off, images encoded once per step and shared by
           policy and reference, vocabulary projection only at completion positions.
Also naive+shared_image and naive+compact_vocab (one saving each) to attribute the gain.
All are the real jitted step (`steps.make_train_step`: loss, grads w.r.t. the LoRA adapters,
AdamW update) on a synthetic batch shaped like real use: 448x448 images (1024 patches -> 256
image tokens), a ~30-token prompt, 100-200 completion tokens, half thinking pairs (same image
on both sides), half perception pairs (another image).

First the machine's matmul peak (jitted 2048^3, f32 and bf16 operands with f32 accumulation),
then per preset: median step seconds over --reps steady-state steps (after compile), ratios,
MFU, XLA temp bytes (compiled.memory_analysis()) and XLA's own FLOP count. JSON -> bench/results/.

MFU = model FLOPs per step / step seconds / measured f32 peak, with model FLOPs by formula
(MaxText-style, counted the same for both variants, i.e. the work a peer's step does):
  LLM forward  = 2 * N_llm * T + 2 * L^2 * n_heads * head_dim * layers * S   (causal attention halved)
                 + 2 * H * V * T                                         (vocab projection, every position)
  ViT forward  = 2 * N_vit * patches + attention (full-attention blocks over each image,
                 windowed blocks over their windows)
  step         = 2 * LLM forward (policy forward + backward; only the LoRA adapters train, so
                 the backward computes activation gradients, not the base weights' gradients:
                 MaxText's x3 counts both) + 1 * LLM forward (reference)
                 + 2 * ViT forward (policy and reference images; the ViT is frozen, no backward)
N = matmul parameters (embedding gather excluded), T = tokens = S sequences x L.
The same formula with 1 ViT encode and the vocab projection over the compact slab only gives
`formula_flops_executed` per variant (what it really has to compute).

    JAX_PLATFORMS=cpu python bench/bench_step.py              # tiny and small, ~5 min on 2 cores
"""

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import time

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cpo_jax import models
from cpo_jax import sharding
from cpo_jax.models import lora
from cpo_jax.train import completion
from cpo_jax.train import naive
from cpo_jax.train import objectives
from cpo_jax.train import optimizer
from cpo_jax.train import pair_images
from cpo_jax.train import stages
from cpo_jax.train import steps

# Token ids inside the presets' small vocabularies (the real Qwen ids exceed them).
TOKENS = dict(image_token_id=5, video_token_id=6, vision_start_token_id=3, vision_end_token_id=4)
PAD, IM_START, IM_END = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Variant:
  """One way to compute the CPO++ step (all give the same numbers)."""

  frozen_copy: bool  # a separate frozen reference model (what peers hold)
  shared_image: bool  # images encoded once, shared by policy and reference
  compact_vocab: bool  # vocabulary projection only at completion positions
  pair_layout: tuple | None = None  # grouped pairs: a thinking pair's image encoded once
  precomputed: bool = False  # reference log-probs streamed with the batch

  def loss_fn(self, model, batch, grid, cfg):
    if not self.frozen_copy:  # the default step, vision attention blocked as the CLI's
      return objectives.cpo_loss_fn(
        model,
        batch,
        grid,
        cfg,
        pair_layout=self.pair_layout,
        vision_score_bytes=stages.vision_score_bytes(),
      )
    if not (self.shared_image or self.compact_vocab):
      return naive.naive_cpo_loss_fn(model, batch, grid, cfg)
    return _one_saving(self, model, batch, grid, cfg)


def _one_saving(variant, model, batch, grid, cfg):
  """The naive step with one of the two savings switched on, to attribute the gain."""
  policy, reference = objectives.policy_and_reference(model)
  n, length = batch['chosen_input_ids'].shape
  forward = {}
  if variant.shared_image:
    embeds = pair_images.pair_image_embeds(policy, batch, grid)
    forward['image_embeds'] = jax.lax.stop_gradient(embeds)
  else:
    pixels = [batch['chosen_pixel_values'], batch['rejected_pixel_values']]
    forward.update(
      pixel_values=jnp.concatenate(pixels), image_grid_thw=completion.grid_rows(2 * n, grid)
    )
  if variant.compact_vocab:
    forward['num_positions'] = completion.completion_positions(length, grid, policy)
  rows = objectives.pair_rows(batch)

  def logps(m):
    return objectives.pair_logps(m, rows, n, cfg, **forward)

  pol = logps(policy)
  ref_c, ref_r = objectives.reference_of(policy, reference, logps)
  return objectives.preference_objective(pol, ref_c, ref_r, batch, cfg)


VARIANTS = {
  'naive': Variant(frozen_copy=True, shared_image=False, compact_vocab=False),
  'naive+shared_image': Variant(frozen_copy=True, shared_image=True, compact_vocab=False),
  'naive+compact_vocab': Variant(frozen_copy=True, shared_image=False, compact_vocab=True),
  'optimized': Variant(frozen_copy=False, shared_image=True, compact_vocab=True),
  # Beyond the default step: the batch's rows alternate thinking / perception pairs
  # (data.pair_layout=grouped at thinking_fraction 0.5), so a thinking pair's image is
  # encoded once; and cpo.reference='precomputed' (no reference forward in the step).
  'optimized+grouped_pairs': Variant(False, True, True, pair_layout=(1, 2)),
  'optimized+grouped+precomputed_ref': Variant(
    False, True, True, pair_layout=(1, 2), precomputed=True
  ),
}


def matmul_peak(n=2048, reps=5):
  """GFLOP/s of a jitted n^3 matmul: f32, and bf16 operands accumulating in f32."""
  out = {}
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.normal(size=(n, n)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(n, n)), jnp.float32)
  for name, dt in (('f32', jnp.float32), ('bf16_f32acc', jnp.bfloat16)):
    x, y = a.astype(dt), b.astype(dt)
    f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    jax.block_until_ready(f(x, y))
    times = []
    for _ in range(reps):
      t = time.perf_counter()
      jax.block_until_ready(f(x, y))
      times.append(time.perf_counter() - t)
    out[name] = 2 * n**3 / statistics.median(times) / 1e9
  return out


def synthetic_batch(batch, seq_len, grid, rng, vocab, answer_len=(100, 200)):
  """A CPO batch as the pipeline makes it (right padded), with random tokens and images;
  completions of answer_len[0] to answer_len[1] - 1 tokens (plus <|im_end|>)."""
  n_patches = int(np.prod(grid))
  n_image = n_patches // 4
  rows = {
    p + k: []
    for p in ('chosen_', 'rejected_')
    for k in ('input_ids', 'attention_mask', 'loss_mask')
  }
  words = lambda k: rng.integers(16, vocab, k).tolist()
  for _ in range(batch):
    prompt = (
      [IM_START]
      + words(3)
      + [TOKENS['vision_start_token_id']]
      + [TOKENS['image_token_id']] * n_image
      + [TOKENS['vision_end_token_id']]
      + words(24)
      + [IM_END, IM_START]
      + words(1)
    )
    for side in ('chosen_', 'rejected_'):
      answer = words(int(rng.integers(*answer_len))) + [IM_END]
      ids = prompt + answer
      if len(ids) > seq_len:
        raise ValueError(f'seq_len {seq_len} < {len(ids)}')
      pad = seq_len - len(ids)
      rows[side + 'input_ids'].append(ids + [PAD] * pad)
      rows[side + 'attention_mask'].append([1] * len(ids) + [0] * pad)
      rows[side + 'loss_mask'].append([0] * len(prompt) + [1] * len(answer) + [0] * pad)
  out = {k: np.asarray(v, np.int32) for k, v in rows.items()}
  source = np.arange(batch, dtype=np.int32) % 2  # 0 thinking (same image), 1 perception
  chosen_px = rng.normal(size=(batch, n_patches, 1176)).astype(np.float32)
  other_px = rng.normal(size=(batch, n_patches, 1176)).astype(np.float32)
  rejected_px = np.where((source == 0)[:, None, None], chosen_px, other_px)
  out.update(
    chosen_pixel_values=chosen_px.reshape(-1, 1176),
    rejected_pixel_values=rejected_px.reshape(-1, 1176),
    image_grid_thw=np.tile(np.asarray(grid, np.int32), (batch, 1)),
    source=source,
    sample_weight=np.ones(batch, np.float32),
  )
  return out


def _matmul_params(module, exclude=()):
  n = 0
  for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    if isinstance(var, lora.LoRAParam) or any(e in path for e in exclude):
      continue
    shape = np.shape(var.get_value())
    if len(shape) >= 2:
      n += int(np.prod(shape))
  return n


def placed_step(stage, mesh, batch):
  """The stage's jitted train step, and its inputs (trainable, frozen, optimizer state, batch)
  placed on `mesh`."""
  tr_sh = sharding.state_shardings(stage.trainable, mesh)
  fr_sh = sharding.state_shardings(stage.frozen, mesh)
  trainable = jax.device_put(stage.trainable, tr_sh)
  frozen = jax.device_put(stage.frozen, fr_sh)
  opt_state = jax.jit(stage.tx.init)(trainable)
  opt_sh = jax.tree.map(lambda x: x.sharding, opt_state)
  data = jax.device_put(batch, sharding.batch_sharding(mesh))
  step = steps.make_train_step(stage, mesh, (tr_sh, fr_sh, opt_sh))
  return step, (trainable, frozen, opt_state, data)


def write_result(out_dir, prefix, load_before, **payload):
  """Writes payload + the machine's description to out_dir/<prefix>_<UTC stamp>.json."""
  machine = dict(
    platform=platform.platform(),
    cpus=os.cpu_count(),
    devices=[str(d) for d in jax.devices()],
    jax=jax.__version__,
    load_average_before=load_before,
    load_average_after=os.getloadavg(),
  )
  os.makedirs(out_dir, exist_ok=True)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%dT%H%M%SZ')
  path = os.path.join(out_dir, f'{prefix}_{stamp}.json')
  with open(path, 'w') as f:
    json.dump(dict(machine=machine, **payload), f, indent=1)
  return path


def step_configs(rpo_alpha=0.1):
  """(loss config, optimizer config) of the benchmarked CPO++ step: sigmoid DPO at beta 0.1 +
  rpo_alpha NLL, unweighted sources; AdamW (0.9, 0.98), wd 0.05, lr 1e-4, clip 1."""
  cfg = ml_collections.ConfigDict(
    dict(
      beta=0.1,
      loss_type='sigmoid',
      label_smoothing=0.0,
      rpo_alpha=rpo_alpha,
      source_weights=(1.0, 1.0, 1.0),
      normalize_weights=True,
      answer_weight=1.0,
      end_token_weight=1.0,
    )
  )
  opt = ml_collections.ConfigDict(
    dict(
      lr=1e-4,
      end_lr_ratio=1e-3,
      warmup_frac=0.05,
      b1=0.9,
      b2=0.98,
      weight_decay=0.05,
      grad_clip=1.0,
    )
  )
  return cfg, opt


def model_flops(
  model,
  config,
  batch,
  seq_len,
  grid,
  *,
  vit_encodes=2,
  head_positions=None,
  reference_forward=True,
  shared_prefix=None,
):
  """Peer-style model FLOPs of one CPO++ step (see module docstring). `vit_encodes` and
  `head_positions` (projected positions per sequence) give the formula count of what a
  variant executes instead (1 encode, the compact slab); `shared_prefix` (P, S): every pair
  runs a P-token prefix once and two S-token continuations that attend to it (causal
  attention: a continuation's queries see P + s keys)."""
  tc, vc = config.text_config, config.vision_config
  seqs = 2 * batch
  n_llm = _matmul_params(model.layers)
  per_key = 2 * tc.num_attention_heads * (tc.hidden_size // tc.num_attention_heads)
  per_key *= tc.num_hidden_layers  # QK^T and PV per (query, key), every layer
  if shared_prefix:
    p, s = shared_prefix
    tokens = batch * p + seqs * s
    attn = per_key * (batch * p**2 / 2 + seqs * (s * p + s**2 / 2)) * 2
  else:
    tokens = seqs * seq_len
    attn = per_key * seqs * seq_len**2
  head = 2 * tc.hidden_size * tc.vocab_size * seqs * (head_positions or seq_len)
  llm_fwd = 2 * n_llm * tokens + attn + head
  patches_per_image = int(np.prod(grid))
  n_vit = _matmul_params(model.visual)
  window = (
    vc.window_size // vc.spatial_merge_size // vc.patch_size
  ) ** 2 * vc.spatial_merge_size**2
  full_blocks = len(vc.fullatt_block_indexes)
  per_block = lambda span: 4 * patches_per_image * span * vc.hidden_size
  vit_attn = (
    full_blocks * per_block(patches_per_image)
    + (vc.depth - full_blocks) * per_block(min(window, patches_per_image))
  ) * seqs
  vit_fwd = 2 * n_vit * patches_per_image * seqs + vit_attn
  return (
    2 * llm_fwd + reference_forward * llm_fwd + vit_encodes * vit_fwd,
    dict(llm_forward=llm_fwd, vit_forward=vit_fwd),
  )


def bench_preset(
  preset,
  *,
  batch,
  seq_len,
  image_size,
  reps,
  peak,
  rng,
  dtype=jnp.float32,
  variants=tuple(VARIANTS),
):
  config = models.get_config(preset, **TOKENS)
  grid = np.asarray([1, image_size // 14, image_size // 14])
  cfg, opt = step_configs()
  raw = synthetic_batch(batch, seq_len, grid, rng, config.text_config.vocab_size)
  prepared = stages.step_inputs(
    raw, grid, config, ('chosen_', 'rejected_'), extra=('source', 'sample_weight')
  )
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  results, runs = {}, {}
  for variant in variants:
    spec = VARIANTS[variant]
    data_in = dict(prepared)
    if spec.precomputed:  # what ReferenceTable streams: [pairs, 2] log-probs
      data_in['reference_logps'] = np.zeros((batch, 2), np.float32)
    t_setup = time.perf_counter()
    model = models.Qwen2_5_VL(config, dtype=dtype, rngs=nnx.Rngs(0))
    reference = nnx.clone(model) if spec.frozen_copy else None
    lora.apply_lora(model, rank=8, alpha=32.0, rngs=nnx.Rngs(1))
    stage_model = model if reference is None else objectives.PolicyAndReference(model, reference)
    graphdef, trainable, frozen = steps.split_model(stage_model, 'lora')
    tx, schedule = optimizer.make_optimizer(opt, 1000)
    loss_fn = lambda m, b, spec=spec: spec.loss_fn(m, b, grid, cfg)
    stage = steps.Stage('cpo_plus', graphdef, trainable, frozen, loss_fn, tx, schedule)
    step, (trainable, frozen, opt_state, data) = placed_step(stage, mesh, data_in)
    t0 = time.perf_counter()
    print(f'{preset} {variant}: set up in {t0 - t_setup:.1f} s, compiling', flush=True)
    compiled = step.lower(trainable, frozen, opt_state, data).compile()
    compile_s = time.perf_counter() - t0
    print(f'{preset} {variant}: compiled in {compile_s:.1f} s', flush=True)
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    state = [trainable, frozen, opt_state, data]
    state[0], state[2], metrics = compiled(*state)  # warm-up
    jax.block_until_ready(metrics)
    runs[variant] = (compiled, state)
    results[variant] = dict(
      step_s_all=[],
      compile_s=compile_s,
      temp_bytes=int(mem.temp_size_in_bytes),
      argument_bytes=int(mem.argument_size_in_bytes),
      xla_flops=float(cost.get('flops', float('nan'))) if cost else None,
      loss=float(metrics['loss']),
      preference_loss=float(metrics['preference_loss']),
    )
  # Interleaved reps: on a shared machine both variants see the same background load.
  for _ in range(reps):
    for variant, (compiled, state) in runs.items():
      t = time.perf_counter()
      state[0], state[2], metrics = compiled(*state)
      jax.block_until_ready(metrics)
      results[variant]['step_s_all'].append(time.perf_counter() - t)
  for variant, r in results.items():
    r['step_s_median'] = statistics.median(r['step_s_all'])
    print(json.dumps({'preset': preset, 'variant': variant, **r}), flush=True)
  flops, parts = model_flops(model, config, batch, seq_len, grid)
  slab = completion.completion_positions(seq_len, grid, model)
  for variant in variants:
    spec = VARIANTS[variant]
    # vit_encodes counts encodes of the 2 * batch sequences' images: a grouped layout
    # (t, g) skips the rejected image of t of every g pairs.
    t, g = spec.pair_layout or (0, 1)
    results[variant]['formula_flops_executed'] = model_flops(
      model,
      config,
      batch,
      seq_len,
      grid,
      vit_encodes=(1 - t / g / 2) * (1 if spec.shared_image else 2),
      head_positions=slab if spec.compact_vocab else None,
      reference_forward=not spec.precomputed,
    )[0]
  for r in results.values():
    r['mfu_f32_peak'] = flops / r['step_s_median'] / (peak['f32'] * 1e9)
    r['mfu_bf16acc_peak'] = flops / r['step_s_median'] / (peak['bf16_f32acc'] * 1e9)
    # Executed FLOPs per second over the peak of the compute dtype: how busy the chip is.
    r['hfu_executed'] = (
      r['formula_flops_executed']
      / r['step_s_median']
      / (peak['bf16_f32acc' if dtype == jnp.bfloat16 else 'f32'] * 1e9)
    )
  # Ratios against 'naive' (or the first variant run) and of 'optimized' (or the last).
  n = results.get('naive', results[variants[0]])
  o = results.get('optimized', results[variants[-1]])
  summary = dict(
    preset=preset,
    batch_pairs=batch,
    seq_len=seq_len,
    image_size=image_size,
    image_tokens=int(np.prod(grid)) // 4,
    model_flops_per_step=flops,
    model_flops_parts=parts,
    speedup=n['step_s_median'] / o['step_s_median'],
    temp_bytes_ratio_optimized_over_naive=o['temp_bytes'] / max(n['temp_bytes'], 1),
    temp_plus_argument_bytes_ratio=(o['temp_bytes'] + o['argument_bytes'])
    / max(n['temp_bytes'] + n['argument_bytes'], 1),
    formula_flops_ratio_optimized_over_naive=o['formula_flops_executed']
    / n['formula_flops_executed'],
    # XLA's count: far below the formula here; likely loop bodies (scanned layers) count once.
    xla_flops_ratio_optimized_over_naive=(o['xla_flops'] / n['xla_flops'])
    if n['xla_flops']
    else None,
    same_loss_abs_diff=abs(n['loss'] - o['loss']),  # same weights, same batch, one update: ~0
    naive=n,
    optimized=o,
    attribution_speedup={k: n['step_s_median'] / r['step_s_median'] for k, r in results.items()},
    variants=results,
  )
  return summary


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--presets', default='tiny,small')
  ap.add_argument('--batch', type=int, default=2, help='preference pairs per step')
  ap.add_argument('--seq-len', type=int, default=512)
  ap.add_argument('--image-size', type=int, default=448)
  ap.add_argument('--reps', type=int, default=7)
  ap.add_argument(
    '--dtype',
    default='float32',
    choices=('float32', 'bfloat16'),
    help='compute dtype (params stay float32)',
  )
  ap.add_argument('--variants', default=','.join(VARIANTS))
  ap.add_argument(
    '--matmul-n', type=int, default=2048, help='side of the peak matmul (8192 on a GPU)'
  )
  ap.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results'))
  a = ap.parse_args()

  load_before = os.getloadavg()  # a shared machine: say how loaded it was
  peak = matmul_peak(a.matmul_n)
  print(json.dumps({'matmul_peak_gflops': peak}), flush=True)
  rng = np.random.default_rng(0)
  rows = [
    bench_preset(
      p,
      batch=a.batch,
      seq_len=a.seq_len,
      image_size=a.image_size,
      reps=a.reps,
      peak=peak,
      rng=rng,
      dtype=jnp.dtype(a.dtype),
      variants=tuple(a.variants.split(',')),
    )
    for p in a.presets.split(',')
  ]
  print(
    f'\nmatmul peak ({a.matmul_n}^3): f32 {peak["f32"]:.1f} GFLOP/s, bf16 x bf16 -> f32 {peak["bf16_f32acc"]:.1f} GFLOP/s'
  )
  print(
    f'{"preset":8}{"naive s":>10}{"opt s":>10}{"speedup":>9}{"MFU naive":>11}{"MFU opt":>9}'
    f'{"temp opt/naive":>16}{"temp+args opt/naive":>21}{"formula FLOPs opt/naive":>25}'
    f'{"XLA flops* opt/naive":>22}'
  )
  for r in rows:
    print(
      f'{r["preset"]:8}{r["naive"]["step_s_median"]:10.4f}{r["optimized"]["step_s_median"]:10.4f}'
      f'{r["speedup"]:9.2f}{r["naive"]["mfu_f32_peak"]:11.1%}{r["optimized"]["mfu_f32_peak"]:9.1%}'
      f'{r["temp_bytes_ratio_optimized_over_naive"]:16.3f}{r["temp_plus_argument_bytes_ratio"]:21.3f}'
      f'{r["formula_flops_ratio_optimized_over_naive"]:25.3f}{r["xla_flops_ratio_optimized_over_naive"] or 0:22.3f}'
    )
  print(
    '* XLA cost_analysis: far below the formula here, likely because loop bodies (scanned layers) count once.'
  )
  print(
    f'\n{"preset":8}{"variant":36}{"step s":>9}{"vs naive":>9}{"MFU":>7}{"HFU exec":>9}{"temp GB":>9}'
  )
  for r in rows:
    for k, v in r['variants'].items():
      mfu = v['mfu_bf16acc_peak'] if a.dtype == 'bfloat16' else v['mfu_f32_peak']
      print(
        f'{r["preset"]:8}{k:36}{v["step_s_median"]:9.4f}{r["attribution_speedup"][k]:9.2f}'
        f'{mfu:7.1%}{v["hfu_executed"]:9.1%}{v["temp_bytes"] / 1e9:9.2f}'
      )
  print(
    f'MFU: peer-style model FLOPs over the {a.dtype} matmul peak; HFU exec: the FLOPs each variant '
    f'executes (formula) over the same peak.'
  )
  path = write_result(
    a.out, 'bench_step', load_before, args=vars(a), matmul_peak_gflops=peak, presets=rows
  )
  print('wrote', path)


if __name__ == '__main__':
  main()
