"""Shared helpers of bench/peers.py: the peers' processor, the LoRA targets, the data, weights.

Owns what both halves of the benchmark (peers_train, peers_generate) and its entry point use:
`LLM_LINEAR` (the LoRA target modules on TRL's side), `ImageTextProcessor` (Qwen2.5-VL's
processor without torchvision), `torch_matmul_peak` (torch's side of the matmul yardstick),
`small_peers` and `save_perturbed` (the tokenizer, `small` model and processor both sides
load), `perturbed` (their weights), and the synthetic preference rows (`smooth_image`,
`make_rows`) that the training batch and the generation prompts are made from.
"""

import os
import re
import statistics
import time

from flax import nnx
import jax
import numpy as np
from PIL import Image
import torch
import transformers

from cpo_jax import models
from cpo_jax.data import tokenizer as tok_lib
from cpo_jax.models import hf_io
from cpo_jax.models import presets

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


def small_peers(side):
  """(tokenizer, the `small` preset's config with the tokenizer's special ids, the peers'
  processor of side x side images): what every peers bench builds both sides from."""
  tok = tok_lib.build_tokenizer()
  ids = tok_lib.special_ids(tok)
  config = models.get_config(
    'small', **{k: ids[k] for k in presets.TOKEN_KEYS if k != 'vocab_size'}
  )
  if len(tok) > config.text_config.vocab_size:  # its vocabulary must fit in the preset's
    raise ValueError(f'tokenizer ({len(tok)}) exceeds the preset vocabulary')
  image_processor = (
    transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil(
      min_pixels=side * side, max_pixels=side * side
    )
  )
  processor = ImageTextProcessor(image_processor, tok, chat_template=tok_lib.CHAT_TEMPLATE)
  return tok, config, processor


def save_perturbed(config, scale, directory):
  """The weights both sides load: the model of `config` at seed 0, `perturbed`, written with
  `save_hf` to <directory>/base; returns that path."""
  path = os.path.join(directory, 'base')
  hf_io.save_hf(perturbed(models.Qwen2_5_VL(config, rngs=nnx.Rngs(0)), scale), path)
  return path


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
