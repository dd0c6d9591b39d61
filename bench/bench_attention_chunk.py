"""Benchmark (not a test): the CPO++ step with text attention in one shot vs in query blocks.

`model.attention_chunk` (models/attention.py) trades one extra pass over each block's scores in
the backward pass for float32 scores [B, heads, chunk, S] instead of [B, heads, L, S]. This
measures both sides on the machine at hand, in one run: seconds per step (interleaved reps, so
every chunk sees the same background load), XLA's scratch bytes, and the loss (the same up to
float32 summation order). The step is bench_step's `optimized` CPO++ step (LoRA r=8, reference
= adapters off, compact vocabulary) on its synthetic 448x448 image + text pairs.

    JAX_PLATFORMS=cpu python bench/bench_attention_chunk.py --preset=small --seq-len=2048
"""

import argparse
import os
import statistics
import time

import bench_step
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from cpo_jax import models
from cpo_jax import sharding
from cpo_jax.models import lora
from cpo_jax.train import objectives
from cpo_jax.train import optimizer
from cpo_jax.train import stages
from cpo_jax.train import steps


def build(config, chunk, dtype):
  """The benchmarked model: the preset with LoRA r=8 adapters, attention in `chunk` blocks."""
  model = models.Qwen2_5_VL(config, dtype=dtype, rngs=nnx.Rngs(0), attention_chunk=chunk)
  lora.apply_lora(model, rank=8, alpha=32.0, rngs=nnx.Rngs(1))
  return model


def compiled_step(graphdef, trainable, frozen, data_in, grid, mesh):
  """(compiled step, its inputs, XLA memory analysis) for one model graph (one chunk)."""
  cfg, opt = bench_step.step_configs()
  tx, schedule = optimizer.make_optimizer(opt, 1000)
  loss_fn = lambda m, b: objectives.cpo_loss_fn(m, b, grid, cfg)
  stage = steps.Stage('cpo_plus', graphdef, trainable, frozen, loss_fn, tx, schedule)
  step, state = bench_step.placed_step(stage, mesh, data_in)
  compiled = step.lower(*state).compile()
  return compiled, list(state), compiled.memory_analysis()


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--preset', default='small')
  ap.add_argument('--chunks', default='0,512,256', help='attention chunks; the first is the base')
  ap.add_argument('--batch', type=int, default=1, help='preference pairs per step')
  ap.add_argument('--seq-len', type=int, default=2048)
  ap.add_argument('--image-size', type=int, default=448)
  ap.add_argument('--reps', type=int, default=5)
  ap.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  ap.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results'))
  a = ap.parse_args()
  load_before = os.getloadavg()
  chunks = [int(c) for c in a.chunks.split(',')]
  config = models.get_config(a.preset, **bench_step.TOKENS)
  grid = np.asarray([1, a.image_size // 14, a.image_size // 14])
  raw = bench_step.synthetic_batch(
    a.batch, a.seq_len, grid, np.random.default_rng(0), config.text_config.vocab_size
  )
  data_in = stages.step_inputs(
    raw, grid, config, ('chosen_', 'rejected_'), extra=('source', 'sample_weight')
  )
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  dtype = jnp.dtype(a.dtype)
  # One set of weights for every chunk (a large preset's random init is slow): the chunk is
  # in the graph only. The trainable adapters are copied per chunk: the step donates them.
  _, trainable, frozen = steps.split_model(build(config, chunks[0], dtype), 'lora')
  runs, results = {}, {}
  for chunk in chunks:
    graphdef = steps.split_model(nnx.eval_shape(lambda c=chunk: build(config, c, dtype)), 'lora')[0]
    t0 = time.perf_counter()
    compiled, state, memory = compiled_step(
      graphdef, jax.tree.map(jnp.copy, trainable), frozen, data_in, grid, mesh
    )
    compile_s = time.perf_counter() - t0
    state[0], state[2], metrics = compiled(*state)  # warm-up
    runs[chunk] = (compiled, state)
    results[chunk] = dict(
      compile_s=compile_s,
      temp_bytes=int(memory.temp_size_in_bytes),
      loss=float(metrics['loss']),
      step_s_all=[],
    )
    print(f'chunk {chunk}: compiled in {compile_s:.1f} s', flush=True)
  for _ in range(a.reps):  # interleaved: every chunk sees the same background load
    for chunk, (compiled, state) in runs.items():
      t = time.perf_counter()
      state[0], state[2], metrics = compiled(*state)
      jax.block_until_ready(metrics)
      results[chunk]['step_s_all'].append(time.perf_counter() - t)
  base = results[chunks[0]]
  base['step_s_median'] = statistics.median(base['step_s_all'])
  print(f'\n{"chunk":>6}{"step s":>9}{"vs base":>9}{"temp GB":>9}{"temp vs base":>13}{"loss":>12}')
  for chunk, r in results.items():
    r['step_s_median'] = statistics.median(r['step_s_all'])
    r['step_time_ratio_vs_base'] = r['step_s_median'] / base['step_s_median']
    r['temp_bytes_ratio_vs_base'] = r['temp_bytes'] / max(base['temp_bytes'], 1)
    print(
      f'{chunk:6d}{r["step_s_median"]:9.3f}{r["step_time_ratio_vs_base"]:9.2f}'
      f'{r["temp_bytes"] / 1e9:9.2f}{r["temp_bytes_ratio_vs_base"]:13.3f}{r["loss"]:12.6f}'
    )
  path = bench_step.write_result(
    a.out,
    f'attention_chunk_{a.preset}',
    load_before,
    args=vars(a),
    chunks={str(c): r for c, r in results.items()},
  )
  print('wrote', path)


if __name__ == '__main__':
  main()
