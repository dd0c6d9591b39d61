"""Benchmark (not a test): the generation half of bench/peers.py alone, and where its time goes.

The same setting as peers.py part 2 (the `small` preset with perturbed weights written by
`save_hf` and loaded by both sides, 4 prompts with a 448 px image each, left padded, greedy,
64 new tokens, no EOS stop): `peers_generate.bench_generate` times ours against transformers'
`generate` interleaved (medians; the whole call, and the prefill alone, so each side's time
splits into prefill and time per decoded token) and checks that the tokens are identical.
Then our prefill's two parts alone, jitted, compile excluded: the vision tower, and the text
decoder over the prompt (image features given).

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
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_step  # noqa: E402
import peers_common  # noqa: E402
import peers_generate  # noqa: E402

from cpo_jax import models  # noqa: E402
from cpo_jax.data import tokenizer as tok_lib  # noqa: E402
from cpo_jax.models import decode  # noqa: E402
from cpo_jax.models import hf_io  # noqa: E402
from cpo_jax.models import layers  # noqa: E402
from cpo_jax.models import presets  # noqa: E402
from cpo_jax.models.qwen2_5_vl import causal_padding_mask  # noqa: E402


def _processor(tok, side):
  """The peers' processor (peers.py): images of side x side pixels."""
  image_processor = (
    transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil(
      min_pixels=side * side, max_pixels=side * side
    )
  )
  return peers_common.ImageTextProcessor(image_processor, tok, chat_template=tok_lib.CHAT_TEMPLATE)


def time_prefill_parts(model, np_in, new_tokens, reps):
  """Medians (s) of our prefill's parts, each jitted alone as generate runs them: the vision
  tower, and the text decoder over the prompt (image features given; decode.prefill)."""
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
  parts = {'vision': [], 'text_decoder': []}
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(vision(state, pixels))
    parts['vision'].append(time.perf_counter() - t)
    t = time.perf_counter()
    jax.block_until_ready(text(state, ids, embeds, pos, mask))
    parts['text_decoder'].append(time.perf_counter() - t)
  return {k: statistics.median(v) for k, v in parts.items()}


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
  tok = tok_lib.build_tokenizer()
  ids = tok_lib.special_ids(tok)
  config = models.get_config(
    'small', **{k: ids[k] for k in presets.TOKEN_KEYS if k != 'vocab_size'}
  )
  processor = _processor(tok, a.image_size)
  with tempfile.TemporaryDirectory() as tmp:
    base_dir = os.path.join(tmp, 'base')
    hf_io.save_hf(
      peers_common.perturbed(models.Qwen2_5_VL(config, rngs=nnx.Rngs(0)), a.perturb), base_dir
    )
    inputs = peers_generate.generation_inputs(a, tok, processor)
    threads = peers_generate.pick_torch_threads(a.torch_threads, base_dir, inputs)
    gen = peers_generate.bench_generate(a, tok, inputs, base_dir)
    parts = time_prefill_parts(
      hf_io.load_hf(base_dir), {k: v.numpy() for k, v in inputs.items()}, a.gen_tokens, a.gen_reps
    )
  result = dict(
    torch_threads=threads,
    args=vars(a),
    command='python bench/generate_split.py',
    generate=gen,
    ours_prefill_parts_s_median=parts,
  )
  print(json.dumps({k: v for k, v in gen.items() if not k.endswith('_all')}, indent=1))
  print(json.dumps({'ours_prefill_parts_s_median': parts}))
  p, d = gen['prefill_s_median'], gen['decode_s_per_token_step']
  print(
    f'\ngreedy generation, {a.gen_prompts} prompts x {a.gen_tokens} tokens, medians of '
    f'{a.gen_reps} interleaved runs (torch threads {threads["used"]}):\n'
    f'  whole call  ours {gen["ours_s_median"]:.3f} s, transformers '
    f'{gen["transformers_s_median"]:.3f} s -> {gen["generate_speedup_vs_transformers"]:.2f}x\n'
    f'  prefill     ours {p["ours"]:.3f} s, transformers {p["transformers"]:.3f} s -> '
    f'{gen["prefill_speedup_vs_transformers"]:.2f}x (ours: vision {parts["vision"]:.3f} s, '
    f'text decoder {parts["text_decoder"]:.3f} s)\n'
    f'  per token   ours {d["ours"] * 1e3:.2f} ms, transformers {d["transformers"] * 1e3:.2f} ms '
    f'-> {gen["decode_speedup_vs_transformers"]:.2f}x\n'
    f'  tokens identical: {gen["tokens_identical"]}'
  )
  print('wrote', bench_step.write_result(a.out, 'generate', load_before, **result))


if __name__ == '__main__':
  main()
