"""Benchmark (not a test): a real preset's SFT and CPO++ steps at the paper's shapes, one chip.

The configuration is the real presets' (`config_defaults.paper_recipe`): bf16 weights and
compute, `model.remat=full`, `model.attention_chunk=512`, LoRA r=8 alpha=32 on every linear
layer of the LLM, ViT frozen. SFT: LoRA adapters, `--sft-rows` rows. Then the adapters are
merged (as after the paper's SFT) and CPO++ gets new ones: `--pairs` pairs in the grouped layout
(thinking, perception, ...), reference = adapters off, once with full rows and once with the
shared-prefix step (the thinking pairs' image and prompt once). Rows are `--seq-len` tokens
long and filled: a 448x448 image (256 tokens), a ~30-token prompt and a completion that fills
the rest but for up to 64 pad tokens. Random weights.

Reported per step: median seconds over --reps after one warm-up, XLA's scratch bytes, and MFU
= model FLOPs (bench_step.model_flops: a peer's count, 2 x forward for a LoRA step's forward
and backward, + the reference forward in CPO++) / seconds / the bf16 matmul peak measured in
the same run. JSON (written after each step, so a cut run keeps what it measured) to --out.

    python bench/bench_real_step.py --preset 7b        # on a GPU

Needs jax with CUDA, flax, optax, orbax, transformers, grain (+ portpicker, cloudpickle),
array_record and ml_collections (wheels for the GPU machine's Python: see bench/gpu.sh).
"""

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import time

import bench_step
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from cpo_jax import config_defaults
from cpo_jax import models
from cpo_jax import sharding
from cpo_jax.models import lora
from cpo_jax.train import stages

SIDES = ('chosen_', 'rejected_')


def timed(stage, prepare, raw, mesh, reps):
  """(median s per step, scratch bytes, first loss, compile s) of the stage's jitted step."""
  # the step donates its trainable state: a copy, so the next step can start from the same
  stage = dataclasses.replace(stage, trainable=jax.tree.map(jnp.copy, stage.trainable))
  step, state = bench_step.placed_step(stage, mesh, prepare(raw))
  t = time.perf_counter()
  compiled = step.lower(*state).compile()
  compile_s = time.perf_counter() - t
  state = list(state)
  times, loss = [], None
  for _ in range(reps + 1):
    t = time.perf_counter()
    state[0], state[2], metrics = compiled(*state)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
    loss = loss if loss is not None else float(metrics['loss'])
  temp = int(compiled.memory_analysis().temp_size_in_bytes)
  return statistics.median(times[1:]), temp, loss, compile_s


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--preset', default='7b')
  ap.add_argument('--seq-len', type=int, default=2048)
  ap.add_argument('--image-size', type=int, default=448)
  ap.add_argument('--pairs', type=int, default=2)
  ap.add_argument('--sft-rows', type=int, default=2)
  ap.add_argument('--reps', type=int, default=4)
  ap.add_argument('--matmul-n', type=int, default=8192)
  ap.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results'))
  a = ap.parse_args()
  out = dict(args=vars(a), machine=dict(platform=platform.platform(), jax=jax.__version__))
  out['machine']['devices'] = [str(d) for d in jax.devices()]
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%dT%H%M%SZ')
  path = os.path.join(a.out, f'real_step_{a.preset}_{stamp}.json')
  os.makedirs(a.out, exist_ok=True)

  def save():
    with open(path, 'w') as f:
      json.dump(out, f, indent=1)
    print(json.dumps({k: v for k, v in out.items() if k not in ('args', 'machine')}), flush=True)

  out['matmul_peak_gflops'] = bench_step.matmul_peak(a.matmul_n)
  peak = out['matmul_peak_gflops']['bf16_f32acc'] * 1e9
  cfg = config_defaults.base_config(f'model={a.preset}', domain='medical', data='synth_cxr')
  cfg.sft.grad_accum_steps = cfg.cpo.grad_accum_steps = 1  # the rows here are one chip's
  config = models.get_config(a.preset, **bench_step.TOKENS)
  grid = np.asarray([1, a.image_size // 14, a.image_size // 14])
  n_image = int(np.prod(grid)) // 4
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  t = time.perf_counter()
  model = models.Qwen2_5_VL(
    config,
    dtype=jnp.bfloat16,
    param_dtype=jnp.bfloat16,
    rngs=nnx.Rngs(0),
    remat=cfg.model.remat,
    attention_chunk=cfg.model.attention_chunk,
  )
  out['init_s'] = time.perf_counter() - t
  save()
  prompt_len = n_image + 33  # bench_step.synthetic_batch's prompt
  fill = (a.seq_len - prompt_len - 64, a.seq_len - prompt_len)
  rng = np.random.default_rng(0)
  vocab = config.text_config.vocab_size
  flops, parts = bench_step.model_flops(model, config, 1, a.seq_len, grid)
  per_seq = dict(llm=parts['llm_forward'] / 2, vit=parts['vit_forward'] / 2)

  # SFT with LoRA (the chosen rows of a batch), then merged.
  raw = bench_step.synthetic_batch(a.sft_rows, a.seq_len, grid, rng, vocab, fill)
  sft_raw = {k[len('chosen_') :]: v for k, v in raw.items() if k.startswith('chosen_')}
  sft_raw['image_grid_thw'] = raw['image_grid_thw']
  stage, prepare = stages.sft_stage(stages.sft_model(model, cfg), cfg, grid)
  s, temp, loss, compile_s = timed(stage, prepare, sft_raw, mesh, a.reps)
  sft_flops = a.sft_rows * (2 * per_seq['llm'] + per_seq['vit'])
  out['sft'] = dict(step_s=s, temp_bytes=temp, loss=loss, compile_s=compile_s)
  out['sft'].update(model_flops=sft_flops, mfu=sft_flops / s / peak, rows=a.sft_rows)
  save()
  lora.merge_lora(model, copy=False)
  del stage

  raw = bench_step.synthetic_batch(a.pairs, a.seq_len, grid, rng, vocab, fill)
  adapted = stages.attach_adapters(model, cfg)
  cpo_flops = bench_step.model_flops(model, config, a.pairs, a.seq_len, grid)[0]
  longest = int(raw['chosen_loss_mask'].sum(1).max()), int(raw['rejected_loss_mask'].sum(1).max())
  for name, shared in (('cpo_shared_prefix', True), ('cpo_full_rows', False)):
    c = cfg.copy_and_resolve_references()
    c.cpo.shared_prefix = shared
    c.data.max_prompt_len = prompt_len
    c.data.max_completion_len = max(longest)
    stage, prepare = stages.cpo_stage(adapted, c, grid, pair_layout=(1, 2))
    s, temp, loss, compile_s = timed(stage, prepare, raw, mesh, a.reps)
    out[name] = dict(step_s=s, temp_bytes=temp, loss=loss, compile_s=compile_s)
    out[name].update(model_flops=cpo_flops, mfu=cpo_flops / s / peak, pairs=a.pairs)
    save()
  print('wrote', path)


if __name__ == '__main__':
  main()
