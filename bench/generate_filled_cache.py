"""Benchmark (not a test): does attending only over the filled part of the KV cache pay?

Our decode step (models/decode.py) attends over the whole static cache (prompt + every new
token's slot, the unfilled ones masked) at every token. The variant here, a benchmark-only
copy of the step, attends over the cache's first n keys only, n the smallest multiple of
`--chunk` (capped at the cache) that holds the current slot: a lax.switch over those static
lengths in every layer (exact: a masked key adds exactly 0). It is swapped in for the timed
calls of `cpo_jax.generate.generate` and out again (each variant its own compiled program).

Same setting as bench/generate_split.py (the `small` preset, 4 prompts with a 448 px image,
left padded, greedy, no EOS stop), at the issue's 64 new tokens and at a longer answer
(512), interleaved, medians; the tokens must be identical.

    /work/venv-peers/bin/python bench/generate_filled_cache.py  # -> results/generate_filled_cache_<UTC>.json
"""

import argparse
import contextlib
import functools
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_step  # noqa: E402
import peers_common  # noqa: E402
import peers_generate  # noqa: E402

from cpo_jax import generate as generate_lib  # noqa: E402
from cpo_jax.models import decode  # noqa: E402
from cpo_jax.models import hf_io  # noqa: E402


def filled_lengths(first_slot, size, chunk):
  """Key counts to choose from: multiples of chunk, capped at the cache size, from the first
  that holds slot `first_slot` (the first decoded token's) to the whole cache."""
  first = first_slot // chunk + 1
  return tuple(min(m * chunk, size) for m in range(first, -(-size // chunk) + 1))


def filled_decode_layer(
  layer, x, cos, sin, k_cache, v_cache, slot, key_valid, *, first_slot, chunk
):
  """decode.decode_layer with the attention over the filled part of the cache only."""
  q, k, v = layer.project(x, cos, sin)
  k_cache = jax.lax.dynamic_update_slice(
    k_cache, decode._heads_major(k, k_cache.dtype), (0, 0, slot, 0)
  )
  v_cache = jax.lax.dynamic_update_slice(
    v_cache, decode._heads_major(v, v_cache.dtype), (0, 0, slot, 0)
  )
  lengths = filled_lengths(first_slot, k_cache.shape[2], chunk)
  scale = layer.head_dim**-0.5
  branches = [
    lambda q, k, v, valid, n=n: decode.attend_cache(
      q, k[:, :, :n], v[:, :, :n], valid[:, :n], scale
    )
    for n in lengths
  ]
  index = jnp.sum(jnp.asarray(lengths[:-1]) <= slot)  # the first length that holds the slot
  o = jax.lax.switch(
    index, branches, q[:, 0], k_cache.astype(q.dtype), v_cache.astype(q.dtype), key_valid
  )
  return layer.finish(x, o[:, None]), k_cache, v_cache


@contextlib.contextmanager
def filled_variant(program, first_slot, chunk):
  """generate() runs `program` (its own jit of the same function) with the filled-only layer."""
  saved = generate_lib._generate, decode.decode_layer
  generate_lib._generate = program
  decode.decode_layer = functools.partial(filled_decode_layer, first_slot=first_slot, chunk=chunk)
  try:
    yield
  finally:
    generate_lib._generate, decode.decode_layer = saved


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--image-size', type=int, default=448)
  ap.add_argument('--question-words', type=int, default=9)
  ap.add_argument('--gen-prompts', type=int, default=4)
  ap.add_argument('--new-tokens', default='64,512')
  ap.add_argument('--chunk', type=int, default=128)
  ap.add_argument('--reps', type=int, default=5)
  ap.add_argument('--perturb', type=float, default=0.05)
  ap.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results'))
  a = ap.parse_args()
  load_before = os.getloadavg()
  tok, config, processor = peers_common.small_peers(a.image_size)
  with tempfile.TemporaryDirectory() as tmp:
    base_dir = peers_common.save_perturbed(config, a.perturb, tmp)
    a.gen_tokens = 0  # generation_inputs reads only the prompt settings
    inputs = peers_generate.generation_inputs(a, tok, processor)
    model = hf_io.load_hf(base_dir)
  np_in = {k: v.numpy() for k, v in inputs.items()}
  prompt_len = np_in['input_ids'].shape[1]
  static = ('graphdef', 'grid', 'max_new_tokens', 'pad', 'greedy', 'rows_sharding')
  static += ('unroll_layers', 'vision_score_bytes')  # generate._generate's
  program = jax.jit(generate_lib._generate.__wrapped__, static_argnames=static)

  def run(n, filled):
    ctx = filled_variant(program, prompt_len, a.chunk) if filled else contextlib.nullcontext()
    with ctx:
      t = time.perf_counter()
      out = np.asarray(
        generate_lib.generate(
          model,
          np_in['input_ids'],
          np_in['attention_mask'],
          np_in['pixel_values'],
          np_in['image_grid_thw'],
          max_new_tokens=n,
          eos_token_id=[-1],
          pad_token_id=tok.pad_token_id,
        )
      )
      return time.perf_counter() - t, out

  rows = []
  for n in (int(x) for x in a.new_tokens.split(',')):
    same = np.array_equal(run(n, False)[1], run(n, True)[1])  # compiles both
    times = {'whole_cache': [], 'filled_only': []}
    for _ in range(a.reps):
      times['whole_cache'].append(run(n, False)[0])
      times['filled_only'].append(run(n, True)[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    rows.append(
      dict(
        new_tokens=n,
        cache_len=prompt_len + n,
        key_lengths=filled_lengths(prompt_len, prompt_len + n, a.chunk),
        tokens_identical=bool(same),
        s_median=med,
        filled_over_whole=med['filled_only'] / med['whole_cache'],
        s_all=times,
      )
    )
    print(
      f'{n} new tokens (cache {prompt_len + n}, key lengths {rows[-1]["key_lengths"]}): whole '
      f'{med["whole_cache"]:.3f} s, filled-only {med["filled_only"]:.3f} s '
      f'({rows[-1]["filled_over_whole"]:.2f}x the time); tokens identical: {same}',
      flush=True,
    )
  path = bench_step.write_result(
    a.out,
    'generate_filled_cache',
    load_before,
    args=vars(a),
    command='python bench/generate_filled_cache.py',
    prompt_len_padded=int(prompt_len),
    results=rows,
  )
  print('wrote', path)


if __name__ == '__main__':
  main()
