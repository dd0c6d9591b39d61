"""Packing token ids into static-shape rows, and length buckets that trim trailing padding.

Training rows are right padded (prompt, then completion; the loss mask marks the completion),
eval prompts left padded (decoding continues from the last position). Over-long sequences are
a bad record (`OverlongError`), never truncated.
"""

from __future__ import annotations

import numpy as np

from cpo_jax.data.bad_records import BadRecordError
from cpo_jax.data.bad_records import OverlongError


def pack_right(
  prompt: tuple[int, ...],
  completion: tuple[int, ...],
  max_len: int,
  pad_id: int,
  record_id,
  unk_id: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  if unk_id is not None and (unk_id in completion or unk_id in prompt):
    # the small word-level tokenizer maps unseen words to <unk>: that text is not learnable
    raise BadRecordError(
      "unknown_token",
      record_id,
      "text has words outside the tokenizer vocabulary "
      "(build_tokenizer(extra_texts=...) or use the model's own tokenizer)",
    )
  n = len(prompt) + len(completion)
  if n > max_len:
    raise OverlongError(
      record_id,
      f"{n} tokens ({len(prompt)} prompt + {len(completion)} completion) "
      f"> max_len {max_len}; raise max_len (never truncated)",
    )
  ids = np.full(max_len, pad_id, np.int32)
  ids[:n] = prompt + completion
  attn = np.zeros(max_len, np.int32)
  attn[:n] = 1
  loss = np.zeros(max_len, np.int32)
  loss[len(prompt) : n] = 1
  return ids, attn, loss


def pack_left(
  prompt: tuple[int, ...], max_len: int, pad_id: int, record_id
) -> tuple[np.ndarray, np.ndarray]:
  n = len(prompt)
  if n > max_len:
    raise OverlongError(record_id, f"prompt of {n} tokens > max_prompt_len {max_len}")
  ids = np.full(max_len, pad_id, np.int32)
  ids[max_len - n :] = prompt
  attn = np.zeros(max_len, np.int32)
  attn[max_len - n :] = 1
  return ids, attn


def parse_length_buckets(spec, max_len: int) -> tuple[int, ...]:
  """Config data.length_buckets ('64,80', or a sequence of ints) -> the static lengths a
  training batch may have, increasing and ending with max_len. '' / () = (max_len,): off."""
  items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s) for s in spec]
  items = [s for s in items if s]
  try:
    out = [int(s) for s in items]
  except ValueError:
    raise ValueError(
      f"data.length_buckets={spec!r}: expected comma-separated ints such as '64,80'"
    ) from None
  if (
    any(b <= 0 for b in out)
    or any(a >= b for a, b in zip(out, out[1:]))
    or (out and out[-1] > max_len)
  ):
    raise ValueError(
      f"data.length_buckets={spec!r}: expected strictly increasing positive lengths, each <= "
      f"data.max_len ({max_len}); max_len is always the last bucket"
    )
  return tuple(out) if out and out[-1] == max_len else tuple(out) + (max_len,)


class TrimToBucket:
  """Cuts a right-padded training batch down to the smallest bucket that holds all its rows.

  Only all-pad trailing columns go, so it is exact: under causal attention a later (pad)
  position never changes an earlier one. Both sides of a pair share one length (the step
  concatenates them). Stateless: the iterator state is the same with or without it."""

  def __init__(self, buckets: tuple[int, ...], prefixes: tuple[str, ...]):
    self.buckets, self.prefixes = buckets, prefixes

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = max(int(batch[p + "attention_mask"].sum(1).max()) for p in self.prefixes)
    length = next(b for b in self.buckets if b >= n)  # pack_right kept every row <= max_len
    for p in self.prefixes:
      for k in ("input_ids", "attention_mask", "loss_mask"):
        batch[p + k] = np.ascontiguousarray(batch[p + k][:, :length])
    return batch


def stack_rows(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Stack per-example arrays; pixel_values are concatenated to [B*P, D] (HF layout)."""
  out = {}
  for k in rows[0]:
    v = np.stack([r[k] for r in rows])
    out[k] = v.reshape(-1, v.shape[-1]) if k.endswith("pixel_values") else v
  return out
