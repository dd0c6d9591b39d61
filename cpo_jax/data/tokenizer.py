"""A small word-level tokenizer for the synthetic domains, shaped like Qwen2.5-VL's.

Why word-level: the tiny model has a few hundred vocabulary rows instead of 151k, and
every concept word is one token, so chains stay short (~30 tokens). Why Qwen's special
tokens and chat template: the same pipeline code then serves a real Qwen2.5-VL tokenizer
(`load_tokenizer(path)` on a Hugging Face directory) unchanged.

Pieces are words with their leading space (' traffic'), punctuation and newlines, and the
decoder concatenates them, so decode(encode(text)) == text for in-vocabulary text.
"""

from __future__ import annotations

import os
import re
from typing import Iterable

from tokenizers import Regex
from tokenizers import Tokenizer
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers
from transformers import PreTrainedTokenizerFast

from cpo_jax.knowledge.graph import THINK_CLOSE
from cpo_jax.knowledge.graph import THINK_OPEN
from cpo_jax.knowledge.graph import load_graph

PAD, EOS = "<|endoftext|>", "<|im_end|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
VIDEO_PAD, VISION_PAD = "<|video_pad|>", "<|vision_pad|>"
UNK = "<unk>"
# Same order as Qwen2.5's added tokens (ids differ: this vocabulary is ours).
SPECIAL_TOKENS = [
  PAD,
  IM_START,
  IM_END,
  "<|object_ref_start|>",
  "<|object_ref_end|>",
  "<|box_start|>",
  "<|box_end|>",
  "<|quad_start|>",
  "<|quad_end|>",
  VISION_START,
  VISION_END,
  VISION_PAD,
  IMAGE_PAD,
  VIDEO_PAD,
  UNK,
]
DEFAULT_SYSTEM = "You are a helpful assistant."

# Qwen2-VL's chat template (images as {"type": "image"} content items), default system prompt.
CHAT_TEMPLATE = (
  "{% set image_count = namespace(value=0) %}"
  "{% for message in messages %}"
  "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
  "<|im_start|>{{ message['role'] }}\n"
  "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
  "{% else %}{% for content in message['content'] %}"
  "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
  "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
  "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
  "{% endfor %}<|im_end|>\n{% endif %}"
  "{% endfor %}"
  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Word pieces keep their leading space; '\n' and punctuation are pieces of their own.
_PIECE = r" ?[A-Za-z0-9_]+| ?[^A-Za-z0-9_\s]|\n| "
_PIECE_RE = re.compile(_PIECE)


def domain_corpus(domains: Iterable[str] = ("driving", "medical")) -> list[str]:
  """Every text the synthetic domains can produce: questions, chain sentences, answers, system prompt."""
  texts = [DEFAULT_SYSTEM, "system", "user", "assistant", f"{THINK_OPEN} {THINK_CLOSE}"]
  for name in domains:
    g = load_graph(name)
    texts.append(g.question)
    texts += [" " + s for s in g.all_sentences()] + g.all_sentences()
    texts += [" " + g.answer_text(d) for d in g.decisions] + [g.answer_text(d) for d in g.decisions]
    texts += [" " + g.decision_texts[d] for d in g.decisions]
  return texts


def build_tokenizer(
  extra_texts: Iterable[str] = (), domains: Iterable[str] = ("driving", "medical")
) -> PreTrainedTokenizerFast:
  """Word-level tokenizer over the domain texts (+ extra_texts), with Qwen2.5-VL specials."""
  pieces: dict[str, None] = {}
  for t in list(domain_corpus(domains)) + list(extra_texts):
    for p in _PIECE_RE.findall(t):
      pieces.setdefault(p, None)
  for p in (" ", "\n", ".", ",", "?", ":"):
    pieces.setdefault(p, None)
  vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
  for p in sorted(pieces):  # sorted: the same texts give the same ids
    vocab.setdefault(p, len(vocab))
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(_PIECE), behavior="isolated")
  tok.decoder = decoders.Fuse()
  tok.add_special_tokens(SPECIAL_TOKENS)
  # <think> tags are ordinary (non-special) single tokens, as text the model writes.
  tok.add_tokens([THINK_OPEN, " " + THINK_OPEN, THINK_CLOSE, " " + THINK_CLOSE])
  fast = PreTrainedTokenizerFast(
    tokenizer_object=tok,
    unk_token=UNK,
    pad_token=PAD,
    eos_token=EOS,
    additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (PAD, EOS, UNK)],
    model_max_length=4096,
    padding_side="right",
    clean_up_tokenization_spaces=False,
  )
  fast.chat_template = CHAT_TEMPLATE
  return fast


def save_tokenizer(tok: PreTrainedTokenizerFast, directory: str) -> None:
  os.makedirs(directory, exist_ok=True)
  tok.save_pretrained(directory)


def load_tokenizer(directory: str) -> PreTrainedTokenizerFast:
  """Loads a directory written by `save_tokenizer` (or a Hugging Face Qwen2.5-VL directory)."""
  tok = PreTrainedTokenizerFast.from_pretrained(directory)
  if tok.chat_template is None:
    tok.chat_template = CHAT_TEMPLATE
  return tok


def special_ids(tok) -> dict[str, int]:
  """Ids the model config and the pipeline need (image_token_id, eos, pad, ...)."""
  conv = tok.convert_tokens_to_ids
  return {
    "pad_token_id": conv(PAD),
    "eos_token_id": conv(EOS),
    "im_start_id": conv(IM_START),
    "image_token_id": conv(IMAGE_PAD),
    "video_token_id": conv(VIDEO_PAD),
    "vision_start_token_id": conv(VISION_START),
    "vision_end_token_id": conv(VISION_END),
    "vocab_size": len(tok),
  }
