"""Helpers for tests and benchmarks: tiny transformers configs and processor-shaped inputs."""

from __future__ import annotations

import numpy as np
from transformers import Qwen2_5_VLConfig

VOCAB = 128
IMAGE, VSTART, VEND, PAD, EOS = 120, 121, 122, 0, 123


def tiny_hf_config(
  *,
  heads=4,
  kv_heads=2,
  hidden=64,
  layers=2,
  intermediate=96,
  mrope=(2, 3, 3),
  v_heads=2,
  v_hidden=32,
  depth=2,
  window=56,
  fullatt=(1,),
  tied=True,
  vocab=VOCAB,
):
  return Qwen2_5_VLConfig(
    text_config=dict(
      hidden_size=hidden,
      num_hidden_layers=layers,
      num_attention_heads=heads,
      num_key_value_heads=kv_heads,
      intermediate_size=intermediate,
      vocab_size=vocab,
      rms_norm_eps=1e-6,
      bos_token_id=None,
      eos_token_id=EOS,
      pad_token_id=PAD,
      rope_parameters={'rope_type': 'default', 'rope_theta': 1e6, 'mrope_section': list(mrope)},
    ),
    vision_config=dict(
      depth=depth,
      hidden_size=v_hidden,
      num_heads=v_heads,
      intermediate_size=2 * v_hidden,
      out_hidden_size=hidden,
      window_size=window,
      fullatt_block_indexes=list(fullatt),
      patch_size=14,
      temporal_patch_size=2,
      spatial_merge_size=2,
    ),
    image_token_id=IMAGE,
    vision_start_token_id=VSTART,
    vision_end_token_id=VEND,
    video_token_id=124,
    tie_word_embeddings=tied,
  )


def make_inputs(grids_per_sample, text_lens, rng, pad_to=None, merge=2):
  """Left-padded batch like the processor makes: text, <vision_start>, image tokens,
  <vision_end>, text. grids_per_sample: list (per sample) of [(t, h, w), ...]."""
  rows = []
  for grids, (pre, post) in zip(grids_per_sample, text_lens):
    ids = list(rng.integers(1, IMAGE, pre))
    for t, h, w in grids:
      ids += [VSTART] + [IMAGE] * (t * h * w // merge**2) + [VEND] + list(rng.integers(1, IMAGE, 2))
    ids += list(rng.integers(1, IMAGE, post))
    rows.append(ids)
  length = pad_to or max(map(len, rows))
  input_ids = np.full((len(rows), length), PAD, np.int64)
  mask = np.zeros((len(rows), length), np.int64)
  for i, r in enumerate(rows):
    input_ids[i, length - len(r) :] = r
    mask[i, length - len(r) :] = 1
  grid = np.array([g for gs in grids_per_sample for g in gs], np.int64).reshape(-1, 3)
  n_patches = int(np.prod(grid, -1).sum()) if len(grid) else 0
  pixel_values = rng.standard_normal((n_patches, 3 * 2 * 14 * 14)).astype(np.float32)
  return dict(
    input_ids=input_ids, attention_mask=mask, pixel_values=pixel_values, image_grid_thw=grid
  )


def randomize_torch_model(model, seed=0, scale=0.05):
  """Perturb every parameter (norm weights, zero-init biases too) so a wrong mapping shows."""
  import torch

  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn(p.shape, generator=g))
  return model
