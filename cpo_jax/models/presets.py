"""Model presets as transformers `Qwen2_5_VLConfig`s.

3b/7b/32b/72b follow the released Qwen2.5-VL-*-Instruct config.json files; tiny and small
are CPU-sized models with the same structure (window attention, full-attention blocks,
GQA, M-RoPE). Token ids (vocab_size, image_token_id, ...) are usually overridden by the
caller from its tokenizer: `get_config('tiny', vocab_size=..., image_token_id=...)`.
"""

from __future__ import annotations

import copy

from transformers import Qwen2_5_VLConfig

_QWEN_TOKENS = dict(
  image_token_id=151655,
  video_token_id=151656,
  vision_start_token_id=151652,
  vision_end_token_id=151653,
)
_QWEN_VISION = dict(
  depth=32,
  hidden_size=1280,
  num_heads=16,
  intermediate_size=3420,
  patch_size=14,
  temporal_patch_size=2,
  spatial_merge_size=2,
  window_size=112,
  hidden_act='silu',
  fullatt_block_indexes=[7, 15, 23, 31],
  tokens_per_second=2,
  in_channels=3,
)


def _text(hidden, layers, heads, kv_heads, intermediate, vocab=152064, **kw):
  d = dict(
    hidden_size=hidden,
    num_hidden_layers=layers,
    num_attention_heads=heads,
    num_key_value_heads=kv_heads,
    intermediate_size=intermediate,
    vocab_size=vocab,
    hidden_act='silu',
    rms_norm_eps=1e-6,
    max_position_embeddings=128000,
    bos_token_id=151643,
    eos_token_id=151645,
    rope_parameters={
      'rope_type': 'default',
      'rope_theta': 1000000.0,
      'mrope_section': [16, 24, 24],
    },
  )
  d.update(kw)
  return d


_PRESETS = {
  'tiny': dict(
    vision_config=dict(
      depth=2,
      hidden_size=32,
      num_heads=2,
      intermediate_size=64,
      patch_size=14,
      temporal_patch_size=2,
      spatial_merge_size=2,
      window_size=56,
      fullatt_block_indexes=[1],
      out_hidden_size=64,
      hidden_act='silu',
      tokens_per_second=2,
      in_channels=3,
    ),
    text_config=_text(
      64,
      2,
      4,
      2,
      128,
      vocab=1024,
      max_position_embeddings=4096,
      bos_token_id=None,
      eos_token_id=None,
      rope_parameters={'rope_type': 'default', 'rope_theta': 1000000.0, 'mrope_section': [2, 3, 3]},
    ),
    tie_word_embeddings=True,
    **_QWEN_TOKENS,
  ),
  'small': dict(
    vision_config=dict(
      depth=4,
      hidden_size=128,
      num_heads=4,
      intermediate_size=256,
      patch_size=14,
      temporal_patch_size=2,
      spatial_merge_size=2,
      window_size=56,
      fullatt_block_indexes=[1, 3],
      out_hidden_size=256,
      hidden_act='silu',
      tokens_per_second=2,
      in_channels=3,
    ),
    text_config=_text(
      256,
      4,
      8,
      2,
      768,
      vocab=4096,
      max_position_embeddings=8192,
      bos_token_id=None,
      eos_token_id=None,
      rope_parameters={'rope_type': 'default', 'rope_theta': 1000000.0, 'mrope_section': [4, 6, 6]},
    ),
    tie_word_embeddings=True,
    **_QWEN_TOKENS,
  ),
  '3b': dict(
    vision_config=dict(_QWEN_VISION, out_hidden_size=2048),
    text_config=_text(2048, 36, 16, 2, 11008, vocab=151936),
    tie_word_embeddings=True,
    **_QWEN_TOKENS,
  ),
  '7b': dict(
    vision_config=dict(_QWEN_VISION, out_hidden_size=3584),
    text_config=_text(3584, 28, 28, 4, 18944),
    tie_word_embeddings=False,
    **_QWEN_TOKENS,
  ),
  '32b': dict(
    vision_config=dict(_QWEN_VISION, intermediate_size=3456, out_hidden_size=5120),
    text_config=_text(5120, 64, 40, 8, 27648),
    tie_word_embeddings=False,
    **_QWEN_TOKENS,
  ),
  '72b': dict(
    vision_config=dict(_QWEN_VISION, intermediate_size=3456, out_hidden_size=8192),
    text_config=_text(8192, 80, 64, 8, 29568),
    tie_word_embeddings=False,
    **_QWEN_TOKENS,
  ),
}
_TEXT_KEYS = {
  'vocab_size',
  'hidden_size',
  'num_hidden_layers',
  'num_attention_heads',
  'num_key_value_heads',
  'intermediate_size',
  'rms_norm_eps',
  'max_position_embeddings',
  'bos_token_id',
  'eos_token_id',
  'pad_token_id',
  'rope_parameters',
  'hidden_act',
}

NAMES = tuple(_PRESETS)


# The token ids a tokenizer fixes in the model config (data.processors.Processors.ids has them all).
TOKEN_KEYS = (
  'vocab_size',
  'image_token_id',
  'video_token_id',
  'vision_start_token_id',
  'vision_end_token_id',
  'eos_token_id',
  'pad_token_id',
)


def get_config_for_tokens(name: str, ids, **overrides) -> Qwen2_5_VLConfig:
  """`get_config` sized to a tokenizer: vocabulary size and special token ids from `ids`."""
  return get_config(name, **{k: ids[k] for k in TOKEN_KEYS}, **overrides)


def get_config(name: str, **overrides) -> Qwen2_5_VLConfig:
  """Preset config; top-level overrides (image_token_id, tie_word_embeddings, ...) apply to the
  outer config, text keys (vocab_size, eos_token_id, ...) to text_config, and
  `vision_config={...}` / `text_config={...}` dicts are merged into the sub-configs."""
  name = name.removeprefix('qwen2_5_vl_')  # 'qwen2_5_vl_7b' (DESIGN.md's spelling) == '7b'.
  if name not in _PRESETS:
    raise ValueError(f'unknown model preset {name!r}; choose one of {", ".join(NAMES)}')
  d = copy.deepcopy(_PRESETS[name])
  for k, v in overrides.items():
    if k in ('vision_config', 'text_config'):
      d[k].update(v)
    elif k in _TEXT_KEYS:
      d['text_config'][k] = v
    else:
      d[k] = v
  return Qwen2_5_VLConfig(**d)
