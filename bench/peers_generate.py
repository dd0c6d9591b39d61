"""The generation half of bench/peers.py: transformers' `generate` against ours, greedy.

Owns the generation prompts (`generation_inputs`), the choice of torch's threads for the peer
(`pick_torch_threads`, timed on a forward of its model) and the timed, interleaved comparison
whose tokens must be identical (`bench_generate`, the result's `generate` entry): the whole
call, and the prefill alone (one new token), so each side's time splits into prefill and time
per decoded token. bench/generate_split.py runs this half alone.
"""

import statistics
import time

import numpy as np
import peers_common
import torch
import transformers

from cpo_jax.generate import generate
from cpo_jax.models import hf_io


def generation_inputs(a, tok, processor):
  """The generation prompts, processed (left padded: their lengths differ by a word each)."""
  rng = np.random.default_rng(1)
  rows = [
    peers_common.make_rows(
      tok,
      rng,
      1,
      image_side=a.image_size,
      question_words=a.question_words + i,
      completion_len=8,
    )[0]
    for i in range(a.gen_prompts)
  ]
  texts = [
    processor.apply_chat_template(
      [
        {
          'role': 'user',
          'content': [{'type': 'image'}, {'type': 'text', 'text': r['prompt'][0]['content']}],
        }
      ],
      add_generation_prompt=True,
      tokenize=False,
    )
    for r in rows
  ]
  return processor(
    images=[r['images'][0] for r in rows],
    text=texts,
    padding=True,
    padding_side='left',
    return_tensors='pt',
  )


def pick_torch_threads(setting, base_dir, inputs, reps=3):
  """torch's intra-op threads for the peer: 'default' (one per core, what a user gets), a
  number, or 'auto': the faster of the default and 1 thread on a forward of the peer's model,
  timed here. On a machine whose cores are busy with other work, torch's OpenMP threads wait
  for each other at every op and the default runs many times slower than 1 thread; on a quiet
  machine the default wins. The peer gets its faster setting."""
  default = torch.get_num_threads()
  if setting != 'auto':
    torch.set_num_threads(default if setting == 'default' else int(setting))
    return dict(default=default, used=torch.get_num_threads(), setting=setting)
  hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
    base_dir, dtype=torch.float32
  ).eval()
  times = {}
  for n in sorted({default, 1}, reverse=True):
    torch.set_num_threads(n)
    with torch.inference_mode():
      hf(**inputs)
      runs = []
      for _ in range(reps):
        t = time.perf_counter()
        hf(**inputs)
        runs.append(time.perf_counter() - t)
    times[n] = statistics.median(runs)
  used = min(times, key=times.get)
  torch.set_num_threads(used)
  return dict(default=default, used=used, setting=setting, forward_s_by_threads=times)


def bench_generate(a, tok, inputs, base_dir):
  """Ours against transformers' generate, interleaved, medians: the whole call (a.gen_tokens
  new tokens) and the prefill alone (1 new token: the vision tower and the prompt through the
  decoder), so the time per decoded token is (whole - prefill) / (tokens - 1) on both sides."""
  pad = tok.pad_token_id
  hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
    base_dir, dtype=torch.float32
  ).eval()
  ours_model = hf_io.load_hf(base_dir)
  prompt_len = int(inputs['input_ids'].shape[1])

  def run_hf(new_tokens):
    t = time.perf_counter()
    with torch.inference_mode():
      out = hf.generate(
        **inputs,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=pad,
      )
    return time.perf_counter() - t, out[:, prompt_len:].numpy()

  np_in = {k: v.numpy() for k, v in inputs.items()}

  def run_ours(new_tokens):
    t = time.perf_counter()
    out = generate(
      ours_model,
      np_in['input_ids'],
      np_in['attention_mask'],
      np_in['pixel_values'],
      np_in['image_grid_thw'],
      max_new_tokens=new_tokens,
      eos_token_id=[-1],  # never stops early: a fixed count, as min_new_tokens on the peer
      pad_token_id=pad,
    )
    out = np.asarray(out)
    return time.perf_counter() - t, out

  n = a.gen_tokens
  first_ours_s, ours_tokens = run_ours(n)  # includes compilation
  first_hf_s, hf_tokens = run_hf(n)
  run_ours(1)  # compiles the prefill-only shape
  times = {k: [] for k in ('ours', 'transformers', 'ours_prefill', 'transformers_prefill')}
  for _ in range(a.gen_reps):
    times['ours'].append(run_ours(n)[0])
    times['transformers'].append(run_hf(n)[0])
    times['ours_prefill'].append(run_ours(1)[0])
    times['transformers_prefill'].append(run_hf(1)[0])
  med = {k: statistics.median(v) for k, v in times.items()}
  per_token = {
    side: (med[side] - med[f'{side}_prefill']) / max(n - 1, 1) for side in ('ours', 'transformers')
  }
  new = a.gen_prompts * n
  same = bool(np.array_equal(ours_tokens, hf_tokens))
  return dict(
    prompts=a.gen_prompts,
    prompt_len_padded=prompt_len,
    prompt_lens=inputs['attention_mask'].sum(1).tolist(),
    new_tokens=n,
    reps=a.gen_reps,
    generate_speedup_vs_transformers=med['transformers'] / med['ours'],
    tokens_identical=same,
    first_mismatch=None if same else _first_mismatch(ours_tokens, hf_tokens),
    distinct_tokens_per_row=[len(set(r.tolist())) for r in hf_tokens],
    ours_s_median=med['ours'],
    transformers_s_median=med['transformers'],
    ours_s_all=times['ours'],
    transformers_s_all=times['transformers'],
    prefill_s_median=dict(ours=med['ours_prefill'], transformers=med['transformers_prefill']),
    prefill_speedup_vs_transformers=med['transformers_prefill'] / med['ours_prefill'],
    decode_s_per_token_step=per_token,
    decode_speedup_vs_transformers=per_token['transformers'] / per_token['ours'],
    prefill_s_all=dict(ours=times['ours_prefill'], transformers=times['transformers_prefill']),
    ours_first_call_s_with_compile=first_ours_s,
    transformers_first_call_s=first_hf_s,
    ours_new_tokens_per_s=new / med['ours'],
    transformers_new_tokens_per_s=new / med['transformers'],
  )


def _first_mismatch(a, b):
  row, col = np.argwhere(a != b)[0]
  return dict(row=int(row), token=int(col), ours=int(a[row, col]), transformers=int(b[row, col]))
