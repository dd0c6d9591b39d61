"""Benchmark (not a test): the generation half of bench/peers.py alone, and where its time goes.

The same setting as peers.py part 2 (the `small` preset with perturbed weights written by
`save_hf` and loaded by both sides, 4 prompts with a 448 px image each, left padded, greedy,
64 new tokens, no EOS stop): `peers_generate.bench_generate` times ours against transformers'
`generate` interleaved (medians; the whole call, and the prefill alone, so each side's time
splits into prefill and time per decoded token) and checks that the tokens are identical.
Then each side's prefill in its two parts alone, interleaved, compile excluded: the vision
tower, and the text decoder over the prompt (image features given; the output head at the last
position only, as both generate loops do), with each part's executed GFLOP/s by formula
(bench_step.model_flops, the same count for both sides) beside the machine's matmul peak
(JAX's and torch's f32 2048^3, measured in the same run).

    /work/venv-peers/bin/python bench/generate_split.py    # -> bench/results/generate_<UTC stamp>.json
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_step  # noqa: E402
import peers_common  # noqa: E402
import peers_generate  # noqa: E402

from cpo_jax import models  # noqa: E402
from cpo_jax.models import decode  # noqa: E402
from cpo_jax.models import hf_io  # noqa: E402
from cpo_jax.models import layers  # noqa: E402
from cpo_jax.models.qwen2_5_vl import causal_padding_mask  # noqa: E402


def time_prefill_parts(model, np_in, new_tokens, reps, base_dir):
  """Medians (s) of each side's prefill parts: ours jitted alone as generate runs them (the
  vision tower; the text decoder over the prompt, image features given: decode.prefill), and
  transformers' (its vision tower; its language model over the prompt's embeddings with a
  KV cache, then the head at the last position), interleaved."""
  grid = np_in['image_grid_thw']
  graphdef, state = nnx.split(model)
  ids = jnp.asarray(np_in['input_ids'])
  mask = causal_padding_mask(jnp.asarray(np_in['attention_mask']))
  pos, _ = models.get_rope_index(np_in['input_ids'], np_in['attention_mask'], grid, model.config)
  pos = jnp.asarray(pos, jnp.int32)
  pixels = jnp.asarray(np_in['pixel_values'])
  score_bytes = layers.CPU_SEGMENT_SCORE_BYTES if jax.default_backend() == 'cpu' else None

  @jax.jit
  def vision(state, pixels):
    return nnx.merge(graphdef, state).encode_images(pixels, grid, score_bytes)

  @jax.jit
  def text(state, ids, embeds, pos, mask):
    m = nnx.merge(graphdef, state)
    cos, sin = m.rotary(pos)
    x = m.embed(ids, image_embeds=embeds)
    h, caches = decode.prefill(m, x, cos, sin, mask, ids.shape[1] + new_tokens)
    return m.logits_from_hidden(h), caches

  embeds = jax.block_until_ready(vision(state, pixels))
  jax.block_until_ready(text(state, ids, embeds, pos, mask))
  hf_vision, hf_text = _transformers_parts(base_dir, np_in, model.config.image_token_id)
  parts = {
    'ours': {
      'vision': lambda: jax.block_until_ready(vision(state, pixels)),
      'text_decoder': lambda: jax.block_until_ready(text(state, ids, embeds, pos, mask)),
    },
    'transformers': {'vision': hf_vision, 'text_decoder': hf_text},
  }
  times = {side: {k: [] for k in fns} for side, fns in parts.items()}
  with torch.inference_mode():
    for fns in parts['transformers'].values():
      fns()
    for _ in range(reps):
      for part in ('vision', 'text_decoder'):
        for side, fns in parts.items():
          t = time.perf_counter()
          fns[part]()
          times[side][part].append(time.perf_counter() - t)
  return {side: {k: statistics.median(v) for k, v in d.items()} for side, d in times.items()}


def _transformers_parts(base_dir, np_in, image_token_id):
  """transformers' prefill parts as its generate runs them (the caller holds inference_mode)."""
  hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
    base_dir, dtype=torch.float32
  ).eval()
  t_in = {k: torch.from_numpy(np.asarray(v)) for k, v in np_in.items()}
  ids, am, grid = t_in['input_ids'], t_in['attention_mask'], t_in['image_grid_thw']
  with torch.inference_mode():
    pos, _ = hf.model.get_rope_index(
      ids, (ids == image_token_id).long(), image_grid_thw=grid, attention_mask=am
    )
    embeds = hf.model.get_input_embeddings()(ids)

  def vision():
    return hf.model.visual(t_in['pixel_values'], grid_thw=grid)

  def text():
    out = hf.model.language_model(
      inputs_embeds=embeds, attention_mask=am, position_ids=pos, use_cache=True
    )
    return hf.lm_head(out.last_hidden_state[:, -1:])

  return vision, text


def parts_flops(model, config, np_in):
  """Formula FLOPs (bench_step.model_flops) of the prefill's parts: the vision tower over the
  prompts' images, the text decoder over the padded prompts with the head at one position."""
  rows, length = np_in['input_ids'].shape
  grid = np.asarray(np_in['image_grid_thw'])[0]
  _, f = bench_step.model_flops(
    model, config, rows / 2, length, grid, vit_encodes=1, head_positions=1
  )
  return {'vision': f['vit_forward'], 'text_decoder': f['llm_forward']}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--image-size', type=int, default=448)
  ap.add_argument('--question-words', type=int, default=9, help='~30 prompt text tokens')
  ap.add_argument('--gen-prompts', type=int, default=4)
  ap.add_argument('--gen-tokens', type=int, default=64)
  ap.add_argument('--gen-reps', type=int, default=7)
  ap.add_argument(
    '--perturb', type=float, default=0.05, help='weight noise (peers_common.perturbed)'
  )
  ap.add_argument('--torch-threads', default='auto', help='as in peers.py')
  ap.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results'))
  a = ap.parse_args()
  transformers.logging.set_verbosity_error()
  load_before = os.getloadavg()
  tok, config, processor = peers_common.small_peers(a.image_size)
  with tempfile.TemporaryDirectory() as tmp:
    base_dir = peers_common.save_perturbed(config, a.perturb, tmp)
    inputs = peers_generate.generation_inputs(a, tok, processor)
    threads = peers_generate.pick_torch_threads(a.torch_threads, base_dir, inputs)
    gen = peers_generate.bench_generate(a, tok, inputs, base_dir)
    np_in = {k: v.numpy() for k, v in inputs.items()}
    model = hf_io.load_hf(base_dir)
    parts = time_prefill_parts(model, np_in, a.gen_tokens, a.gen_reps, base_dir)
  peak = dict(
    jax_f32=bench_step.matmul_peak(2048)['f32'], torch_f32=peers_common.torch_matmul_peak(2048)
  )
  flops = parts_flops(model, config, np_in)
  gflops = {
    side: {k: flops[k] / t / 1e9 for k, t in side_parts.items()}
    for side, side_parts in parts.items()
  }
  result = dict(
    torch_threads=threads,
    args=vars(a),
    command='python bench/generate_split.py',
    generate=gen,
    prefill_parts_s_median=parts,
    prefill_parts_flops=flops,
    prefill_parts_executed_gflops_per_s=gflops,
    matmul_peak_gflops=peak,
  )
  print(json.dumps({k: v for k, v in gen.items() if not k.endswith('_all')}, indent=1))
  print(json.dumps({'prefill_parts_s_median': parts, 'matmul_peak_gflops': peak}))
  p, d = gen['prefill_s_median'], gen['decode_s_per_token_step']
  print(
    f'\ngreedy generation, {a.gen_prompts} prompts x {a.gen_tokens} tokens, medians of '
    f'{a.gen_reps} interleaved runs (torch threads {threads["used"]}):\n'
    f'  whole call  ours {gen["ours_s_median"]:.3f} s, transformers '
    f'{gen["transformers_s_median"]:.3f} s -> {gen["generate_speedup_vs_transformers"]:.2f}x\n'
    f'  prefill     ours {p["ours"]:.3f} s, transformers {p["transformers"]:.3f} s -> '
    f'{gen["prefill_speedup_vs_transformers"]:.2f}x\n'
    + ''.join(
      f'    {k:12s} ours {parts["ours"][k]:.3f} s ({gflops["ours"][k]:.0f} GFLOP/s), '
      f'transformers {parts["transformers"][k]:.3f} s ({gflops["transformers"][k]:.0f} GFLOP/s)'
      f' -> {parts["transformers"][k] / parts["ours"][k]:.2f}x\n'
      for k in flops
    )
    + f'    (formula GFLOP: vision {flops["vision"] / 1e9:.1f}, text decoder '
    f'{flops["text_decoder"] / 1e9:.1f}; matmul peak JAX {peak["jax_f32"]:.0f}, torch '
    f'{peak["torch_f32"]:.0f} GFLOP/s)\n'
    f'  per token   ours {d["ours"] * 1e3:.2f} ms, transformers {d["transformers"] * 1e3:.2f} ms '
    f'-> {gen["decode_speedup_vs_transformers"]:.2f}x\n'
    f'  tokens identical: {gen["tokens_identical"]}'
  )
  print('wrote', bench_step.write_result(a.out, 'generate', load_before, **result))


if __name__ == '__main__':
  main()
