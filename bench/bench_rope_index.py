"""Benchmark (not a test): host M-RoPE position ids, whole batch vs one row at a time.

`stages.step_inputs` computes the position ids of every training batch on the host (per side
of a CPO++ batch), so their time sits in the step's path. This times `rope.get_rope_index`
(whole-batch numpy) against `rope.get_rope_index_per_row` (the per-row Python loop it
replaced) on training-shaped rows: one 448x448 image (256 tokens) and text, right padded as
the pipeline packs them, interleaved reps so both see the same background load. It checks the
ids are identical, prints the ratio, and writes bench/results/rope_index_<stamp>.json.

    JAX_PLATFORMS=cpu python bench/bench_rope_index.py --rows=64 --seq-len=2048
"""

import argparse
import os
import statistics
import time

import bench_step
import numpy as np

from cpo_jax.models import rope
from cpo_jax.models import testing


def training_rows(rows, seq_len, seed=0):
  """Right-padded rows like the pipeline's: text, one 448 px image (a 32x32 patch grid), text,
  with lengths spread over the upper half of seq_len."""
  rng = np.random.default_rng(seed)
  image = 32 * 32 // 4 + 2  # merged image tokens + vision start/end
  pre = 30
  post = rng.integers(seq_len // 2, seq_len - image - pre - 2, rows)
  inp = testing.make_inputs([[(1, 32, 32)]] * rows, [(pre, int(p)) for p in post], rng)
  ids, mask = inp['input_ids'], inp['attention_mask']
  right_ids = np.full((rows, seq_len), testing.PAD, ids.dtype)
  right_mask = np.zeros_like(right_ids)
  for r in range(rows):
    n = int(mask[r].sum())
    right_ids[r, :n], right_mask[r, :n] = ids[r, mask[r] == 1], 1
  return right_ids, right_mask, inp['image_grid_thw']


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--rows', type=int, default=64)
  parser.add_argument('--seq-len', type=int, default=2048)
  parser.add_argument('--reps', type=int, default=30)
  parser.add_argument('--out-dir', default=os.path.join(os.path.dirname(__file__), 'results'))
  a = parser.parse_args()
  load_before = os.getloadavg()
  config = testing.tiny_hf_config(layers=1, depth=1)  # only the image token id and merge matter
  ids, mask, grid = training_rows(a.rows, a.seq_len)
  impls = {'per_row': rope.get_rope_index_per_row, 'whole_batch': rope.get_rope_index}
  outs = {name: f(ids, mask, grid, config) for name, f in impls.items()}  # warm-up, and equal?
  identical = all(
    np.array_equal(x, y) for x, y in zip(outs['per_row'], outs['whole_batch'], strict=True)
  )
  times = {name: [] for name in impls}
  for _ in range(a.reps):
    for name, f in impls.items():
      start = time.perf_counter()
      f(ids, mask, grid, config)
      times[name].append(time.perf_counter() - start)
  ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
  speedup = ms['per_row'] / ms['whole_batch']
  print(f'rows x length: {a.rows} x {a.seq_len}, identical ids: {identical}')
  for name in impls:
    print(f'  {name:12s} median {ms[name]:7.2f} ms  min {1e3 * min(times[name]):7.2f} ms')
  print(f'  speedup (per-row / whole-batch, medians): {speedup:.1f}x')
  path = bench_step.write_result(
    a.out_dir,
    'rope_index',
    load_before,
    rows=a.rows,
    seq_len=a.seq_len,
    reps=a.reps,
    identical=identical,
    median_ms=ms,
    min_ms={name: 1e3 * min(t) for name, t in times.items()},
    speedup=speedup,
  )
  print(f'wrote {path}')
  if not identical:
    raise SystemExit('the two forms gave different ids')


if __name__ == '__main__':
  main()
