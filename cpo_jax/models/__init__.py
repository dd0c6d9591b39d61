"""Qwen2.5-VL in Flax NNX: model, presets, LoRA, Hugging Face safetensors import/export."""

from cpo_jax.models.presets import get_config
from cpo_jax.models.presets import get_config_for_tokens
from cpo_jax.models.qwen2_5_vl import Qwen2_5_VL
from cpo_jax.models.qwen2_5_vl import get_rope_index


def load_hf(*args, **kwargs):
  from cpo_jax.models import hf_io

  return hf_io.load_hf(*args, **kwargs)


def save_hf(*args, **kwargs):
  from cpo_jax.models import hf_io

  return hf_io.save_hf(*args, **kwargs)


__all__ = [
  'Qwen2_5_VL',
  'get_config',
  'get_config_for_tokens',
  'get_rope_index',
  'load_hf',
  'save_hf',
]
