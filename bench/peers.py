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
import re
import statistics
import sys
import tempfile
import time

from flax import nnx
import jax
import ml_collections
import numpy as np
from PIL import Image

try:
  import datasets
  import peft
  import torch
  import transformers
  import trl
except ImportError as e:  # the peers are never runtime dependencies
  sys.exit(
    f'{e}: install the peers first: bash bench/peers/setup.sh (or pip install -e ".[bench]")'
  )

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_step  # noqa: E402  (matmul_peak, model_flops: the same yardsticks)

from cpo_jax import models  # noqa: E402
from cpo_jax import sharding  # noqa: E402
from cpo_jax.data import tokenizer as tok_lib  # noqa: E402
from cpo_jax.generate import generate  # noqa: E402
from cpo_jax.models import hf_io  # noqa: E402
from cpo_jax.models import lora  # noqa: E402
from cpo_jax.models import presets  # noqa: E402
from cpo_jax.train import completion  # noqa: E402
from cpo_jax.train import objectives  # noqa: E402
from cpo_jax.train import optimizer  # noqa: E402
from cpo_jax.train import stages  # noqa: E402
from cpo_jax.train import steps  # noqa: E402

# Every linear layer of the LLM, none of the ViT (whose MLP reuses the names gate/up/down_proj).
LLM_LINEAR = r'.*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)'


class ImageTextProcessor(transformers.Qwen2_5_VLProcessor):
  """Qwen2.5-VL's processor without a video processor (the video one needs torchvision)."""

  def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
    self.image_token, self.video_token = tok_lib.IMAGE_PAD, tok_lib.VIDEO_PAD
    self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
    self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
    transformers.ProcessorMixin.__init__(
      self, image_processor, tokenizer, chat_template=chat_template, **kwargs
    )


def torch_matmul_peak(n=2048, reps=5):
  """GFLOP/s of torch's f32 n^3 matmul (the BLAS TRL's step runs on)."""
  a, b = torch.randn(n, n), torch.randn(n, n)
  torch.matmul(a, b)
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    torch.matmul(a, b)
    times.append(time.perf_counter() - t)
  return 2 * n**3 / statistics.median(times) / 1e9


def perturbed(model, scale, seed=7):
  """Adds scale * N(0, 1) to every parameter. At plain initialisation the residual stream is
  mostly the token's own (tied) embedding, so greedy decoding repeats one token and 'tokens
  identical' would check little; perturbed, the next token depends on the prompt and image."""
  key = jax.random.key(seed)
  for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Param))):
    x = var.get_value()
    var.set_value(x + scale * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype))
  return model


def smooth_image(rng, side):
  """A photo-like RGB image (low-frequency colour), PNG-sized like one."""
  small = rng.integers(0, 256, (side // 32, side // 32, 3), dtype=np.uint8)
  img = np.asarray(Image.fromarray(small).resize((side, side), Image.BICUBIC), np.int16)
  img = img + rng.integers(-8, 9, img.shape)
  return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_rows(tok, rng, n, *, image_side, question_words, completion_len):
  """n preference pairs as TRL takes them (conversational, one image) with their images."""
  words = sorted(t for t in tok.get_vocab() if re.fullmatch(r' [a-z]+', t))
  say = lambda k: ''.join(rng.choice(words, k)).strip()
  # The assistant turn renders as '<text><|im_end|>\n': 2 tokens besides the words.
  body = completion_len - 2
  rows = []
  for _ in range(n):
    rows.append(
      dict(
        images=[smooth_image(rng, image_side)],
        prompt=[{'role': 'user', 'content': say(question_words) + '?'}],
        chosen=[{'role': 'assistant', 'content': ' ' + say(body)}],
        rejected=[{'role': 'assistant', 'content': ' ' + say(body)}],
      )
    )
  return rows


def ours_batch(collated, n, n_patches):
  """TRL's collated batch (chosen rows, then rejected rows) -> our step's raw batch."""
  ids = collated['input_ids'].numpy().astype(np.int32)
  am = collated['attention_mask'].numpy().astype(np.int32)
  cm = collated['completion_mask'].numpy().astype(np.int32)
  pv = collated['pixel_values'].numpy().astype(np.float32)
  raw = {}
  for i, side in enumerate(('chosen_', 'rejected_')):
    rows = slice(i * n, (i + 1) * n)
    raw[side + 'input_ids'] = ids[rows]
    raw[side + 'attention_mask'] = am[rows]
    raw[side + 'loss_mask'] = cm[rows]
    raw[side + 'pixel_values'] = pv[i * n * n_patches : (i + 1) * n * n_patches]
  raw.update(
    image_grid_thw=collated['image_grid_thw'].numpy()[:n].astype(np.int32),
    source=np.zeros(n, np.int32),  # thinking pairs
    sample_weight=np.ones(n, np.float32),
  )
  return raw


class OurStep:
  """Our default CPO++ step, compiled, on a batch resident on the device."""

  def __init__(self, model, config, raw, grid, cfg, opt, total_steps):
    lora.apply_lora(model, rank=8, alpha=32.0, rngs=nnx.Rngs(1))
    prepared = stages.step_inputs(
      raw, grid, config, ('chosen_', 'rejected_'), extra=('source', 'sample_weight')
    )
    mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
    graphdef, trainable, frozen = steps.split_model(model, 'lora')
    tx, schedule = optimizer.make_optimizer(opt, total_steps)
    loss_fn = lambda m, b: objectives.cpo_loss_fn(m, b, grid, cfg)
    stage = steps.Stage('cpo_plus', graphdef, trainable, frozen, loss_fn, tx, schedule)
    tr_sh = sharding.state_shardings(trainable, mesh)
    fr_sh = sharding.state_shardings(frozen, mesh)
    trainable, frozen = jax.device_put(trainable, tr_sh), jax.device_put(frozen, fr_sh)
    opt_state = jax.jit(tx.init)(trainable)
    opt_sh = jax.tree.map(lambda x: x.sharding, opt_state)
    data = jax.device_put(prepared, sharding.batch_sharding(mesh))
    step = steps.make_train_step(stage, mesh, (tr_sh, fr_sh, opt_sh))
    t = time.perf_counter()
    self.compiled = step.lower(trainable, frozen, opt_state, data).compile()
    self.compile_s = time.perf_counter() - t
    cost = self.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    self.xla_flops = float(cost.get('flops', float('nan'))) if cost else None
    self.state = [trainable, frozen, opt_state, data]
    self.times, self.metrics = [], []

  def __call__(self):
    t = time.perf_counter()
    s = self.state
    s[0], s[2], metrics = self.compiled(*s)
    jax.block_until_ready(metrics)
    self.times.append(time.perf_counter() - t)
    if not self.metrics:
      self.metrics.append({k: float(v) for k, v in metrics.items() if np.ndim(v) == 0})
    return self.times[-1]


class Interleave(transformers.TrainerCallback):
  """Runs one step of ours after each TRL step; TRL's step = the time outside ours."""

  def __init__(self, ours):
    self.ours, self.trl_times, self.logs, self.t_resume = ours, [], [], None

  def on_train_begin(self, args, state, control, **kw):
    self.t_resume = time.perf_counter()

  def on_step_end(self, args, state, control, **kw):
    self.trl_times.append(time.perf_counter() - self.t_resume)
    self.ours()
    self.t_resume = time.perf_counter()

  def on_log(self, args, state, control, logs=None, **kw):
    self.logs.append(dict(logs or {}))


def make_trainer(a, processor, base_dir, dataset, max_steps, gradient_checkpointing):
  """TRL's DPOTrainer + PEFT on a fresh transformers model from `base_dir`, as a user sets it
  up (see the module docstring for the settings)."""
  hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
    base_dir, dtype=torch.float32
  )
  args = trl.DPOConfig(
    output_dir=os.path.join(base_dir, f'trl_gc{int(gradient_checkpointing)}'),
    per_device_train_batch_size=a.pairs,
    max_steps=max_steps,
    learning_rate=1e-4,
    adam_beta1=0.9,
    adam_beta2=0.98,
    weight_decay=0.05,
    max_grad_norm=1.0,
    beta=0.1,
    loss_type=['sigmoid', 'sft'],
    loss_weights=[1.0, a.rpo_alpha],
    bf16=False,
    gradient_checkpointing=gradient_checkpointing,
    train_sampling_strategy='sequential',
    logging_steps=1,
    save_strategy='no',
    report_to='none',
    use_cpu=True,
    dataloader_num_workers=0,
    disable_tqdm=True,
    seed=0,
  )
  peft_config = peft.LoraConfig(
    r=8, lora_alpha=32, lora_dropout=0.0, target_modules=LLM_LINEAR, task_type='CAUSAL_LM'
  )
  t = time.perf_counter()
  trainer = trl.DPOTrainer(
    model=hf,
    args=args,
    train_dataset=dataset,
    processing_class=processor,
    peft_config=peft_config,
  )
  return trainer, time.perf_counter() - t


def trl_phase(trainer, ours, warmup):
  """trainer.train() with our step after each of its steps: (TRL step seconds, ours, TRL's
  logs), the first `warmup` steps of each side left out."""
  cb = Interleave(ours)
  trainer.add_callback(cb)
  start = len(ours.times)
  trainer.train()
  return cb.trl_times[warmup:], ours.times[start + warmup :], cb.logs


def bench_train(a, tok, processor, config, base_dir, peak):
  n, grid = a.pairs, np.asarray([1, a.image_size // 14, a.image_size // 14])
  n_patches = int(np.prod(grid))
  total, total_gc = a.warmup + a.steps, (a.warmup + a.trl_gc_steps) if a.trl_gc_steps else 0
  rows = make_rows(
    tok,
    np.random.default_rng(0),
    n,
    image_side=a.image_size,
    question_words=a.question_words,
    completion_len=a.completion_len,
  )
  # Every step sees the same n pairs (sequential sampler over n x steps rows).
  dataset = datasets.Dataset.from_list(rows * max(total, total_gc))
  trainer, trl_setup_s = make_trainer(a, processor, base_dir, dataset, total, False)
  lora_modules = sum(
    1 for name, _ in trainer.model.named_modules() if name.endswith('lora_A.default')
  )

  # The batch TRL's collator makes from the dataset's first n rows: ours gets the same arrays.
  collated = trainer.data_collator([dataset[i] for i in range(n)])
  collate_times = []
  for _ in range(3):
    t = time.perf_counter()
    trainer.data_collator([dataset[i] for i in range(n)])  # row decode (PNG) + processing
    collate_times.append(time.perf_counter() - t)
  seq_len = int(collated['input_ids'].shape[1])
  comp = collated['completion_mask'].sum(1).tolist()
  prompt_len = seq_len - a.completion_len
  if comp != [a.completion_len] * (2 * n):
    raise ValueError(f'completion tokens per row {comp}, expected {a.completion_len}')
  raw = ours_batch(collated, n, n_patches)

  cfg = ml_collections.ConfigDict(
    dict(
      beta=0.1,
      loss_type='sigmoid',
      label_smoothing=0.0,
      rpo_alpha=a.rpo_alpha,
      source_weights=(1.0, 1.0, 1.0),
      normalize_weights=True,
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
  model = hf_io.load_hf(base_dir)
  print('ours: compiling the step', flush=True)
  ours = OurStep(model, config, raw, grid, cfg, opt, 1 + total + total_gc)
  print(f'ours: compiled in {ours.compile_s:.1f} s', flush=True)
  ours()  # warm-up, alone: its metrics are the first step's

  print(f'TRL (same work) and ours: {total} steps each, first {a.warmup} warm-up', flush=True)
  trl_s, ours_s, logs = trl_phase(trainer, ours, a.warmup)
  del trainer

  flops_trl, parts = bench_step.model_flops(model, config, n, seq_len, grid)
  slab = completion.completion_positions(seq_len, grid, model)
  flops_ours = bench_step.model_flops(
    model, config, n, seq_len, grid, vit_encodes=1, head_positions=slab
  )[0]
  ours_med, trl_med = statistics.median(ours_s), statistics.median(trl_s)
  first_trl = next(g for g in logs if 'loss' in g)
  first_ours = ours.metrics[0]
  out = dict(
    batch=dict(
      pairs=n,
      kind='thinking (chosen and rejected share the image)',
      image_size=a.image_size,
      image_tokens=n_patches // 4,
      prompt_tokens=prompt_len,
      prompt_text_tokens=prompt_len - n_patches // 4,
      completion_tokens=a.completion_len,
      seq_len=seq_len,
    ),
    steps_timed=len(trl_s),
    warmup_steps=a.warmup,
    speedup_vs_trl=trl_med / ours_med,
    ours_step_s_median=ours_med,
    trl_step_s_median=trl_med,
    ours_step_s_all=ours_s,
    trl_step_s_all=trl_s,
    ours_step_s_alone_warmup=ours.times[0],
    trl_collate_s_median=statistics.median(collate_times),
    trl_collate_note='dataset row fetch (PNG decode) + DataCollatorForVisionPreference for one '
    'batch, timed apart; it is part of every TRL step above',
    ours_compile_s=ours.compile_s,
    trl_setup_s=trl_setup_s,
    executed_gflops_per_s=dict(
      ours=flops_ours / ours_med / 1e9,
      trl=flops_trl / trl_med / 1e9,
      method='formula (bench_step.model_flops): TRL = peer-style count (2 ViT encodes, '
      'full-vocabulary head at every position, policy forward+backward + reference forward); '
      'ours = the same with 1 ViT encode and the head over the completion slab',
    ),
    executed_flops_per_step=dict(ours=flops_ours, trl=flops_trl),
    executed_over_jax_f32_peak=dict(
      ours=flops_ours / ours_med / 1e9 / peak['jax_f32'],
      trl=flops_trl / trl_med / 1e9 / peak['jax_f32'],
    ),
    executed_over_torch_f32_peak=dict(
      ours=flops_ours / ours_med / 1e9 / peak['torch_f32'],
      trl=flops_trl / trl_med / 1e9 / peak['torch_f32'],
    ),
    model_flops_parts=parts,
    ours_xla_cost_analysis_flops=ours.xla_flops,
    ours_xla_cost_analysis_note='XLA cost_analysis() of the compiled step: counts a scanned '
    "(stacked) layer's body once, so far below the formula",
    same_function=dict(
      first_step_loss=dict(ours=first_ours['loss'], trl=first_trl['loss']),
      first_step_logps_chosen=dict(
        ours=first_ours['logps/chosen'], trl=first_trl.get('logps/chosen')
      ),
      first_step_logps_rejected=dict(
        ours=first_ours['logps/rejected'], trl=first_trl.get('logps/rejected')
      ),
    ),
    trl_setup=dict(
      lora_modules=lora_modules,
      target_modules=LLM_LINEAR,
      bf16=False,
      gradient_checkpointing=False,
      loss_type=['sigmoid', 'sft'],
      loss_weights=[1.0, a.rpo_alpha],
      logging_steps=1,
    ),
    trl_gradient_checkpointing=None,
  )
  if total_gc:
    # TRL's default: gradient checkpointing, i.e. the policy's decoder forward runs again in
    # the backward (more work than ours does; counted in its executed FLOPs).
    trainer, _ = make_trainer(a, processor, base_dir, dataset, total_gc, True)
    print(f'TRL (its default checkpointing) and ours: {total_gc} steps each', flush=True)
    gc_s, gc_ours_s, _ = trl_phase(trainer, ours, a.warmup)
    del trainer
    gc_med, gc_ours_med = statistics.median(gc_s), statistics.median(gc_ours_s)
    out['trl_gradient_checkpointing'] = dict(
      steps_timed=len(gc_s),
      speedup_vs_trl=gc_med / gc_ours_med,
      ours_step_s_median=gc_ours_med,
      trl_step_s_median=gc_med,
      ours_step_s_all=gc_ours_s,
      trl_step_s_all=gc_s,
      trl_executed_gflops_per_s=(flops_trl + parts['llm_forward']) / gc_med / 1e9,
      note="TRL's default gradient_checkpointing=True (still fp32): the same step plus a "
      'recomputed policy LLM forward; ours unchanged, interleaved again',
    )
  return out


def generation_inputs(a, tok, processor):
  """The generation prompts, processed (left padded: their lengths differ by a word each)."""
  rng = np.random.default_rng(1)
  rows = [
    make_rows(
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
  pad = tok.pad_token_id
  hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
    base_dir, dtype=torch.float32
  ).eval()
  ours_model = hf_io.load_hf(base_dir)
  prompt_len = int(inputs['input_ids'].shape[1])

  def run_hf():
    t = time.perf_counter()
    with torch.inference_mode():
      out = hf.generate(
        **inputs,
        max_new_tokens=a.gen_tokens,
        min_new_tokens=a.gen_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=pad,
      )
    return time.perf_counter() - t, out[:, prompt_len:].numpy()

  np_in = {k: v.numpy() for k, v in inputs.items()}

  def run_ours():
    t = time.perf_counter()
    out = generate(
      ours_model,
      np_in['input_ids'],
      np_in['attention_mask'],
      np_in['pixel_values'],
      np_in['image_grid_thw'],
      max_new_tokens=a.gen_tokens,
      eos_token_id=[-1],  # never stops early: a fixed count, as min_new_tokens on the peer
      pad_token_id=pad,
    )
    out = np.asarray(out)
    return time.perf_counter() - t, out

  first_ours_s, ours_tokens = run_ours()  # includes compilation
  first_hf_s, hf_tokens = run_hf()
  ours_s, hf_s = [], []
  for _ in range(a.gen_reps):
    ours_s.append(run_ours()[0])
    hf_s.append(run_hf()[0])
  ours_med, hf_med = statistics.median(ours_s), statistics.median(hf_s)
  new = a.gen_prompts * a.gen_tokens
  same = bool(np.array_equal(ours_tokens, hf_tokens))
  return dict(
    prompts=a.gen_prompts,
    prompt_len_padded=prompt_len,
    prompt_lens=inputs['attention_mask'].sum(1).tolist(),
    new_tokens=a.gen_tokens,
    reps=a.gen_reps,
    generate_speedup_vs_transformers=hf_med / ours_med,
    tokens_identical=same,
    first_mismatch=None if same else _first_mismatch(ours_tokens, hf_tokens),
    distinct_tokens_per_row=[len(set(r.tolist())) for r in hf_tokens],
    ours_s_median=ours_med,
    transformers_s_median=hf_med,
    ours_s_all=ours_s,
    transformers_s_all=hf_s,
    ours_first_call_s_with_compile=first_ours_s,
    transformers_first_call_s=first_hf_s,
    ours_new_tokens_per_s=new / ours_med,
    transformers_new_tokens_per_s=new / hf_med,
  )


def _first_mismatch(a, b):
  row, col = np.argwhere(a != b)[0]
  return dict(row=int(row), token=int(col), ours=int(a[row, col]), transformers=int(b[row, col]))


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
    torch_f32=torch_matmul_peak(a.matmul_n),
  )
  print(json.dumps({'matmul_peak_gflops': peak}), flush=True)

  tok = tok_lib.build_tokenizer()
  ids = tok_lib.special_ids(tok)
  # The small preset with our tokenizer's special ids (its vocabulary fits in the preset's).
  config = models.get_config(
    'small', **{k: ids[k] for k in presets.TOKEN_KEYS if k != 'vocab_size'}
  )
  if len(tok) > config.text_config.vocab_size:
    raise ValueError(f'tokenizer ({len(tok)}) exceeds the preset vocabulary')
  side = a.image_size
  image_processor = (
    transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil(
      min_pixels=side * side, max_pixels=side * side
    )
  )
  processor = ImageTextProcessor(image_processor, tok, chat_template=tok_lib.CHAT_TEMPLATE)

  with tempfile.TemporaryDirectory() as tmp:
    base_dir = os.path.join(tmp, 'base')
    hf_io.save_hf(perturbed(models.Qwen2_5_VL(config, rngs=nnx.Rngs(0)), a.perturb), base_dir)
    inputs = generation_inputs(a, tok, processor)
    threads = pick_torch_threads(a.torch_threads, base_dir, inputs)
    print(json.dumps({'torch_threads': threads}), flush=True)
    gen = None if a.skip_generate else bench_generate(a, tok, inputs, base_dir)
    if gen:
      print(json.dumps({'generate': gen}), flush=True)
    train = bench_train(a, tok, processor, config, base_dir, peak)

  versions = {
    p: importlib.metadata.version(p)
    for p in ('jax', 'jaxlib', 'flax', 'torch', 'transformers', 'trl', 'peft', 'accelerate')
  }
  result = dict(
    machine=dict(
      platform=platform.platform(),
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
