"""Benchmark (not a test): where the vocabulary projection of the preference loss costs time and memory.

Three ways to get per-sequence completion logps (forward + backward w.r.t. the hidden states; --grad-kernel adds
the lm_head kernel, which LoRA training keeps frozen):
  full      logits = hidden @ kernel over all L positions, then `sequence_logps`   (what peers do)
  chunked   `token_logps_from_hidden` over all L positions (never a [B, L, V] buffer)
  compact   `compact_completion` to the completion positions, then chunked         (project only where needed)
Prints one JSON line per variant (median step seconds, XLA temp bytes) and the ratios against `full`.

    JAX_PLATFORMS=cpu python bench/bench_losses.py --batch 2 --length 512 --completion 128 --vocab 32768
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from cpo_jax import losses


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument(
    "--length", type=int, default=512, help="sequence length L (image + prompt + completion)"
  )
  ap.add_argument(
    "--completion", type=int, default=128, help="completion tokens per row (at the end)"
  )
  ap.add_argument("--hidden", type=int, default=256)
  ap.add_argument("--vocab", type=int, default=32768)
  ap.add_argument("--chunk", type=int, default=128)
  ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
  ap.add_argument("--iters", type=int, default=5)
  ap.add_argument(
    "--grad-kernel",
    action="store_true",
    help="also differentiate w.r.t. the lm_head kernel (full fine-tuning; with LoRA it is frozen)",
  )
  a = ap.parse_args()

  dt = jnp.dtype(a.dtype)
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=(a.batch, a.length, a.hidden)), dt)
  kernel = jnp.asarray(rng.normal(size=(a.hidden, a.vocab)) / np.sqrt(a.hidden), dt)
  labels = jnp.asarray(rng.integers(0, a.vocab, (a.batch, a.length)), jnp.int32)
  mask = jnp.zeros((a.batch, a.length), jnp.int32).at[:, a.length - a.completion :].set(1)

  def full(h, k):
    return losses.sequence_logps(h @ k, labels, mask)[0].sum()

  def chunked_sum(h, k, lb, mk):
    per_token = losses.token_logps_from_hidden(h, k, lb, chunk_size=a.chunk)
    return losses.reduce_sequence(per_token, mk)[0].sum()

  def chunked(h, k):
    return chunked_sum(h, k, labels, mask)

  def compact(h, k):
    hc, lc, mc, _ = losses.compact_completion(h, labels, mask, a.completion)
    return chunked_sum(hc, k, lc, mc)

  results = {}
  for name, fn in [("full", full), ("chunked", chunked), ("compact", compact)]:
    step = jax.jit(jax.value_and_grad(fn, (0, 1) if a.grad_kernel else 0))
    compiled = step.lower(hidden, kernel).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    value, _ = jax.block_until_ready(compiled(hidden, kernel))
    times = []
    for _ in range(a.iters):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(hidden, kernel))
      times.append(time.perf_counter() - t0)
    results[name] = dict(step_s=statistics.median(times), temp_bytes=int(temp), value=float(value))
    print(json.dumps(dict(variant=name, **vars(a), **results[name])))
  base = results["full"]
  for name in ("chunked", "compact"):
    r = results[name]
    print(
      f"{name:8s}: time x{base['step_s'] / r['step_s']:.2f} faster, temp memory x{base['temp_bytes'] / max(r['temp_bytes'], 1):.1f} "
      f"smaller than full (value diff {abs(r['value'] - base['value']):.3g})"
    )


if __name__ == "__main__":
  main()
