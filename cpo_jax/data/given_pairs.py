"""Given pairs (swift_jsonl, mimic_ccf, codalm) in the grouped CPO++ layout: split by cpo_source.

The synthetic sources make each pair thinking or perception as the layout asks; records that
are pairs already come with their kind. A pair-level source lists every record's cpo_source
without reading it (`pair_sources()`), and the grouped stream (`datasets.make_cpo_dataset`)
draws thinking pairs from one sub-stream and perception and other pairs from another, so its
batches follow the same (t, g) layout as the synthetic ones: the step encodes a thinking pair's
image once and runs its prompt once for both sides (train/shared_prefix.py).

Records of weight 0 (no preference: NO_PREFERENCE) join neither stream. Records that cannot be
read (UNREADABLE) join the larger stream in use, where the bad-record policy meets them.
"""

from __future__ import annotations

from absl import logging
import numpy as np

from cpo_jax.data.pairs import SOURCE_IDS
from cpo_jax.data.swift_jsonl import UNREADABLE

THINKING = SOURCE_IDS["thinking"]
_OTHER_KINDS = "perception or other"


def pair_sources(source) -> np.ndarray:
  """[N] the source's per-record cpo_source ids (or NO_PREFERENCE / UNREADABLE)."""
  listed = getattr(source, "pair_sources", None)
  if listed is None:
    raise ValueError(
      f"{source!r} gives its own pairs but cannot list their cpo_source without reading every "
      "record (no pair_sources()), so the grouped pair layout cannot split it; set "
      "data.pair_layout='mixed'"
    )
  kinds = np.asarray(listed())
  if kinds.shape != (len(source),):
    raise ValueError(f"{source!r}.pair_sources() gave {kinds.shape}, expected ({len(source)},)")
  return kinds


def counts(kinds: np.ndarray) -> tuple[int, int]:
  """(thinking pairs, perception and other pairs) among `kinds`."""
  return int(np.sum(kinds == THINKING)), int(np.sum((kinds >= 0) & (kinds != THINKING)))


def layout_for(source, configured: tuple[int, int]) -> tuple[int, int] | None:
  """The (t, g) layout of the source's CPO++ batches, given the configured one (from
  data.thinking_fraction, `datasets.pair_layout_for`).

  Records of both kinds: the configured layout. Records of one kind only: every batch is that
  kind, (1, 1) or (0, 1), with a warning when the configured share cannot be met; an error when
  the configured layout asks for the missing kind alone (t == g without thinking pairs, t == 0
  without others). No usable kind at all (every record unreadable or of weight 0): None, one
  stream, whose reads report the records."""
  t, g = configured
  n_thinking, n_rest = counts(pair_sources(source))
  found = f"{source!r} has {n_thinking} thinking and {n_rest} {_OTHER_KINDS} pairs"
  if n_thinking and n_rest:
    if t in (0, g):
      logging.warning(
        "%s; data.thinking_fraction=%s trains on the %s pairs only",
        found,
        t / g,
        "thinking" if t else _OTHER_KINDS,
      )
    return (t, g)
  if not (n_thinking or n_rest):
    return None
  if (t == g and not n_thinking) or (t == 0 and not n_rest):
    missing = "thinking" if t == g else _OTHER_KINDS
    raise ValueError(
      f"data.thinking_fraction={t / g} asks for {missing} pairs only, but {found}; choose a "
      "thinking_fraction the records can meet, or data.pair_layout='mixed'"
    )
  if 0 < t < g:
    logging.warning(
      "%s: every CPO++ batch is %s pairs (data.thinking_fraction=%s needs both kinds)",
      found,
      "thinking" if n_thinking else _OTHER_KINDS,
      t / g,
    )
  return (1, 1) if n_thinking else (0, 1)


def stream_positions(source, layout: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """(record indices of the thinking stream, of the other stream) for a (t, g) layout; the
  stream a layout does not use is empty. Raises when a stream it uses would have no records."""
  t, g = layout
  kinds = pair_sources(source)
  thinking = np.flatnonzero(kinds == THINKING) if t > 0 else np.zeros(0, np.int64)
  rest = np.flatnonzero((kinds >= 0) & (kinds != THINKING)) if t < g else np.zeros(0, np.int64)
  for name, used, positions in (("thinking", t > 0, thinking), (_OTHER_KINDS, t < g, rest)):
    if used and not len(positions):
      n_thinking, n_rest = counts(kinds)
      raise ValueError(
        f"pair layout {layout} asks for {name} pairs, but {source!r} has none ({n_thinking} "
        f"thinking, {n_rest} {_OTHER_KINDS}); choose data.thinking_fraction accordingly or "
        "data.pair_layout='mixed'"
      )
  unreadable = np.flatnonzero(kinds == UNREADABLE)
  if len(unreadable):  # read where they are met: skipped and counted, or raised
    if len(thinking) >= len(rest):
      thinking = np.sort(np.concatenate([thinking, unreadable]))
    else:
      rest = np.sort(np.concatenate([rest, unreadable]))
  return thinking, rest
