"""Benchmark (not a test): cpo_jax against its peers, same model, batch and weights, one run.

1. The CPO++ step against TRL's `DPOTrainer` with PEFT, interleaved (ours, TRL, ours, TRL...).
   Both sides get the `small` preset, built once by cpo_jax and written with `save_hf`, so
   transformers' `Qwen2_5_VLForConditionalGeneration` loads the very same weights; fp32; LoRA
   r=8, alpha=32 on every linear layer of the LLM (q/k/v/o/gate/up/down), ViT frozen; the
   reference is the model with its adapters off; sigmoid loss, beta 0.1, plus 0.1 x the chosen
   side's token-mean NLL (our cpo.rpo_alpha; TRL's loss_type ['sigmoid', 'sft'] with weights
   [1, 0.1], the same term); AdamW (0.9, 0.98), weight decay 0.05, gradient clipping 1.0.
   The batch: 2 thinking pairs (chosen and rejected share the image), one 448x448 image each
   (256 image tokens), a ~30-token chat prompt, 128-token chosen and rejected completions.
   TRL is timed as a user sees it: `trainer.train()` on a `datasets.Dataset` of those pairs
   (PIL images, conversational prompt/chosen/rejected), its own collator (image processing and
   tokenisation on the fly), forward, backward, AdamW; a step is the time between two of its
   `on_step_end` callbacks minus our step, which runs inside that callback. Ours is the jitted
   default step (`objectives.cpo_loss_fn`) on the same token ids and pixel values that TRL's
   collator produced, already on the device (in training Grain prefetches the batch).
   The first step of both sides must agree (loss, chosen log-probs): same function.
   Beside it, in the same interleaved run, our step on the default batch layout of the same
   size and shapes (data.pair_layout='grouped', data.thinking_fraction=0.5: 1 thinking pair +
   1 perception pair whose rejected image differs, so its prefix is not shared;
   `peers_train.default_mix_batch`): `train.ours_default_mix_step_s_median` and its ratio to
   TRL's step on TRL's own (all-thinking) batch, which is not the same batch.
2. Greedy generation, 4 prompts with a 448x448 image each (left padded), 64 new tokens (no EOS
   stop): transformers' `generate` (KV cache) against `cpo_jax.generate.generate`, same
   weights, interleaved; the tokens must be identical. The weights are the preset's random
   initialisation plus a little noise (`perturbed`), so greedy decoding is not one repeated token.

Executed FLOP/s by formula (`bench_step.model_flops`, MaxText-style, counted the same way for
both sides): TRL's step executes the peer-style count (2 ViT encodes, full-vocabulary logits at
every position: TRL's chunked log-prob head scores every position off Triton devices, i.e. on
CPU), ours the default step's (1 ViT encode, vocabulary only over the completion slab). XLA's
own count (`cost_analysis()`) is reported beside ours, labelled (it counts a scanned layer once).
The machine's matmul peak is measured in the same run (jitted JAX 2048^3, and torch's).

TRL's defaults differ from ours in two ways that are switched off here so that both do the
same work: bf16 autocast (TRL's default `bf16=True`; fp32 here) and gradient checkpointing
(TRL's default; our step does not recompute). A second, shorter TRL run with its default
gradient checkpointing (still fp32) is interleaved with ours afterwards (`--trl-gc-steps`).
torch runs with the faster of its default threads (one per core) and 1 thread, timed at the
start (`pick_torch_threads`: on a machine shared with other work the default is many times
slower). transformers' Qwen2.5-VL processor needs a video processor, hence torchvision, which
does not import beside the CPU torch here: `ImageTextProcessor` is the same processor without.

This file is the entry point (arguments, the result's JSON and table); the work lives beside it:
`peers_common` (processor, LoRA targets, weights, synthetic rows), `peers_train` (part 1) and
`peers_generate` (part 2), imported as top-level modules from bench/ (on sys.path).

    bash bench/peers/setup.sh                          # its own venv (or: pip install -e '.[bench]')
    ../venv-peers/bin/python bench/peers.py            # ~1.5 min, quiet 2 cores -> bench/results/peers_<date>.json
    ../venv-peers/bin/python bench/peers.py --quick    # 2 steps each, a smoke run (peers_<date>_quick.json)
    # both sides on one thread (XLA's flags must be set before JAX starts):
    XLA_FLAGS='--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1' \
      ../venv-peers/bin/python bench/peers.py --torch-threads 1 --out /tmp/peers_1thread
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
import time

import jax

try:  # checked here, before the sibling modules import them
  import datasets  # noqa: F401
  import peft  # noqa: F401
  import torch
  import transformers
  import trl  # noqa: F401
except ImportError as e:  # the peers are never runtime dependencies
  sys.exit(
    f'{e}: install the peers first: bash bench/peers/setup.sh (or pip install -e ".[bench]")'
  )

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_step  # noqa: E402  (matmul_peak, model_flops: the same yardsticks)
import peers_common  # noqa: E402
import peers_generate  # noqa: E402
import peers_train  # noqa: E402


def print_table(r):
  """The README's table (markdown) from a result."""
  t, g = r['train'], r['generate']
  b = t['batch']
  print(
    f'\n| one run, {r["machine"]["cpus"]}-core CPU, fp32, torch threads '
    f'{r["machine"]["torch_threads"]["used"]} | cpo_jax | peer | ratio |\n'
    '| --- | --- | --- | --- |\n'
    f'| CPO++ step, {b["pairs"]} pairs, {b["seq_len"]} tokens, s/step (TRL {r["versions"]["trl"]} '
    f'DPOTrainer + PEFT {r["versions"]["peft"]}) | {t["ours_step_s_median"]:.3f} | '
    f'{t["trl_step_s_median"]:.3f} | {t["speedup_vs_trl"]:.2f}x |\n'
    f'| executed GFLOP/s (formula; matmul peak JAX {r["matmul_peak_gflops"]["jax_f32"]:.0f}, '
    f'torch {r["matmul_peak_gflops"]["torch_f32"]:.0f}) | {t["executed_gflops_per_s"]["ours"]:.1f} | '
    f'{t["executed_gflops_per_s"]["trl"]:.1f} | |'
  )
  if t.get('ours_default_mix_step_s_median'):
    print(
      f'| the default batch instead (1 thinking + 1 perception pair, same shapes; NOT TRL\'s '
      f'batch: TRL on its {b["pairs"]} thinking pairs) | {t["ours_default_mix_step_s_median"]:.3f} | '
      f'{t["trl_step_s_median"]:.3f} | {t["ours_default_mix_vs_trl_thinking_batch"]:.2f}x |'
    )
  c = t['trl_gradient_checkpointing']
  if c:
    print(
      f'| the same, TRL with its default gradient checkpointing ({c["steps_timed"]} steps) | '
      f'{c["ours_step_s_median"]:.3f} | {c["trl_step_s_median"]:.3f} | '
      f'{c["speedup_vs_trl"]:.2f}x |'
    )
  if g:
    print(
      f'| greedy generation, {g["prompts"]} prompts x {g["new_tokens"]} tokens, s (transformers '
      f'{r["versions"]["transformers"]} generate) | {g["ours_s_median"]:.3f} | '
      f'{g["transformers_s_median"]:.3f} | {g["generate_speedup_vs_transformers"]:.2f}x '
      f'(tokens identical: {g["tokens_identical"]}) |'
    )


def cpu_model():
  """The CPU's model name from /proc/cpuinfo (Linux), else the platform's processor."""
  try:
    with open('/proc/cpuinfo') as f:
      names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
    return names[0] if names else platform.processor()
  except OSError:
    return platform.processor()


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--steps', type=int, default=12, help='timed steps per side, after warm-up')
  ap.add_argument('--warmup', type=int, default=2, help='untimed interleaved steps per side')
  ap.add_argument('--pairs', type=int, default=2, help='preference pairs per step')
  ap.add_argument('--image-size', type=int, default=448)
  ap.add_argument('--question-words', type=int, default=9, help='~30 prompt text tokens')
  ap.add_argument('--completion-len', type=int, default=128)
  ap.add_argument('--rpo-alpha', type=float, default=0.1, help='chosen NLL weight, both sides')
  ap.add_argument(
    '--trl-gc-steps',
    type=int,
    default=6,
    help="timed steps of a second TRL run with its default gradient checkpointing (0: none)",
  )
  ap.add_argument('--gen-prompts', type=int, default=4)
  ap.add_argument('--gen-tokens', type=int, default=64)
  ap.add_argument('--gen-reps', type=int, default=5)
  ap.add_argument('--perturb', type=float, default=0.05, help='weight noise (see `perturbed`)')
  ap.add_argument('--skip-generate', action='store_true')
  ap.add_argument('--quick', action='store_true', help='2 steps each, 2 generation reps')
  ap.add_argument(
    '--no-shared-prefix',
    action='store_true',
    help='our step with full rows (both completions run the image and prompt)',
  )
  ap.add_argument(
    '--torch-threads',
    default='auto',
    help="the peer's torch threads: auto (the faster of its default and 1, see "
    "pick_torch_threads), default (one per core), or a number",
  )
  ap.add_argument('--matmul-n', type=int, default=2048)
  ap.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results'))
  a = ap.parse_args()
  if a.quick:
    a.steps, a.warmup, a.gen_reps, a.trl_gc_steps = 2, 1, 2, min(a.trl_gc_steps, 2)
  t_start = time.perf_counter()
  load_before = os.getloadavg()
  if load_before[0] > 0.5 * os.cpu_count():
    print(
      f'warning: load average {load_before[0]:.1f} on {os.cpu_count()} cores: other work '
      'shares the cores; both sides slow down (torch with one thread per core most: see '
      'pick_torch_threads); a quiet machine gives steadier numbers',
      flush=True,
    )
  transformers.logging.set_verbosity_error()

  jax_peak = bench_step.matmul_peak(a.matmul_n)
  peak = dict(
    jax_f32=jax_peak['f32'],
    jax_bf16_f32acc=jax_peak['bf16_f32acc'],
    torch_f32=peers_common.torch_matmul_peak(a.matmul_n),
  )
  print(json.dumps({'matmul_peak_gflops': peak}), flush=True)

  tok, config, processor = peers_common.small_peers(a.image_size)

  with tempfile.TemporaryDirectory() as tmp:
    base_dir = peers_common.save_perturbed(config, a.perturb, tmp)
    inputs = peers_generate.generation_inputs(a, tok, processor)
    threads = peers_generate.pick_torch_threads(a.torch_threads, base_dir, inputs)
    print(json.dumps({'torch_threads': threads}), flush=True)
    gen = None if a.skip_generate else peers_generate.bench_generate(a, tok, inputs, base_dir)
    if gen:
      print(json.dumps({'generate': gen}), flush=True)
    train = peers_train.bench_train(a, tok, processor, config, base_dir, peak)

  versions = {
    p: importlib.metadata.version(p)
    for p in ('jax', 'jaxlib', 'flax', 'torch', 'transformers', 'trl', 'peft', 'accelerate')
  }
  result = dict(
    machine=dict(
      platform=platform.platform(),
      # The CPU and torch's BLAS: torch's MKL runs slower on AMD than on Intel, which moves
      # the ratio between machines (README).
      cpu_model=cpu_model(),
      torch_blas=torch.__config__.show().split('BLAS_INFO=')[-1].split(',')[0],
      cpus=os.cpu_count(),
      devices=[str(d) for d in jax.devices()],
      torch_threads=threads,
      load_average_before=load_before,
      load_average_after=os.getloadavg(),
    ),
    versions=versions,
    args=vars(a),
    quick=a.quick,
    note=(
      f'{a.steps} timed steps per side after {a.warmup} warm-up'
      + (' (--quick: a smoke run, not a measurement)' if a.quick else '')
    ),
    command='python bench/peers.py' + (' --quick' if a.quick else ''),
    wall_s=None,
    matmul_peak_gflops=peak,
    speedup_vs_trl=train['speedup_vs_trl'],
    # ours on the default half-thinking, half-perception batch of the same shapes, over TRL on
    # its all-thinking batch (not the same batch; train.default_mix_batch says how it differs)
    default_mix_vs_trl_thinking_batch=train.get('ours_default_mix_vs_trl_thinking_batch'),
    executed_gflops_per_s=train['executed_gflops_per_s'],
    speedup_vs_trl_gradient_checkpointing=(train['trl_gradient_checkpointing'] or {}).get(
      'speedup_vs_trl'
    ),
    generate_speedup_vs_transformers=gen and gen['generate_speedup_vs_transformers'],
    tokens_identical=gen and gen['tokens_identical'],
    train=train,
    generate=gen,
  )
  result['wall_s'] = time.perf_counter() - t_start
  g = train['executed_gflops_per_s']
  print(
    f'\nmatmul peak ({a.matmul_n}^3 f32): JAX {peak["jax_f32"]:.1f} GFLOP/s, '
    f'torch {peak["torch_f32"]:.1f} GFLOP/s'
  )
  print(
    f'CPO++ step, {a.pairs} pairs x {train["batch"]["seq_len"]} tokens, {train["steps_timed"]} '
    f'interleaved steps: ours {train["ours_step_s_median"]:.3f} s, TRL '
    f'{train["trl_step_s_median"]:.3f} s -> {train["speedup_vs_trl"]:.2f}x; executed '
    f'GFLOP/s ours {g["ours"]:.1f}, TRL {g["trl"]:.1f} (formula)'
  )
  if train.get('ours_default_mix_step_s_median'):
    print(
      f'ours on the default batch (1 thinking + 1 perception pair): '
      f'{train["ours_default_mix_step_s_median"]:.3f} s -> '
      f'{train["ours_default_mix_vs_trl_thinking_batch"]:.2f}x TRL on its thinking batch'
    )
  sf = train['same_function']
  print(
    f'first step loss ours {sf["first_step_loss"]["ours"]:.6f}, TRL '
    f'{sf["first_step_loss"]["trl"]:.6f}'
  )
  if gen:
    print(
      f'generate {a.gen_prompts} x {a.gen_tokens} tokens: ours {gen["ours_s_median"]:.3f} s, '
      f'transformers {gen["transformers_s_median"]:.3f} s -> '
      f'{gen["generate_speedup_vs_transformers"]:.2f}x; tokens identical: {gen["tokens_identical"]}'
    )
  print_table(result)
  os.makedirs(a.out, exist_ok=True)
  day = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d')
  path = os.path.join(a.out, f'peers_{day}{"_quick" if a.quick else ""}.json')
  with open(path, 'w') as f:
    json.dump(result, f, indent=1)
  print('wrote', path, f'({result["wall_s"]:.0f} s)')


if __name__ == '__main__':
  main()
