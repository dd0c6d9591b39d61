"""Grain datasets per stage: records -> (pairs) -> processor + tokenizer -> static-shape batches.

P = patches per image (64 for 112x112), L = max_len, or with `length_buckets` the smallest
bucket that holds every row of the batch (for a CPO batch: both sides, which share L; see
`packing.parse_length_buckets`).
SFT batch:
  input_ids [B,L] int32 (right padded with pad id), attention_mask [B,L] int32,
  loss_mask [B,L] int32: 1 where input_ids[b,t] is a completion token (the chain, the answer
    and the final <|im_end|>); the logit that predicts it sits at t-1, so a caller does
    logits[:, :-1] vs input_ids[:, 1:] with loss_mask[:, 1:],
  pixel_values [B*P,1176] float32, image_grid_thw [B,3] int32 (identical rows),
  prompt_length [B] int32 (first completion position), decision [B] int32, index [B] int32.
CPO batch (one row = one preference pair):
  chosen_{input_ids,attention_mask,loss_mask} [B,L], chosen_pixel_values [B*P,1176],
  rejected_{input_ids,attention_mask,loss_mask} [B,L], rejected_pixel_values [B*P,1176],
  image_grid_thw [B,3], source [B] int32 (0 thinking, 1 perception, 2 other),
  sample_weight [B] float32 (the record's cpo_sample_weight, 1.0 for synthetic data; per-source
    weights are the loss's source_weights),
  prompt_length [B] int32 (first completion position; for synthetic pairs the prompt ids are
    identical on both sides), rejected_prompt_length [B] int32 (differs only for ingested pairs
    whose rejected prompt text differs),
  chosen_answer_start / rejected_answer_start [B] int32 (the side's first token after its
    '</think>'; the row's completion end when it has none: cpo.answer_weight),
  boxes [B,C,4] int32 (evidence boxes of the chosen image in pixels, for on-device perception
    masks; [B,1,4] = whole image for ingested pairs),
  chosen_decision / rejected_decision / index [B] int32 (diagnostics, -1 when unknown),
  flipped_concept [B] int32 (perception_mode 'counterfactual': the concept index, graph order,
    changed in the rejected image; -1 on other rows and modes).
  Thinking rows (source == 0) have rejected_pixel_values == chosen_pixel_values and the same
  prompt; with the grouped pair layout (`pair_layout_for`) the step knows which rows they are.
Bad records (over-long sequence, unreadable record or image, missing field, empty chain, an
image whose patch grid differs): `on_bad_record='raise'` (default) raises BadRecordError
(OverlongError for length) naming the record and the problem; 'skip' drops the record and
counts it by reason in `skips` (a SkipCounter; counts are per process). Never truncated.
Iterators carry their position (`get_state` / `set_state`), checkpointed with the run.
"""

from __future__ import annotations

import fractions
import functools

import grain
import numpy as np

from cpo_jax.data import examples
from cpo_jax.data import given_pairs
from cpo_jax.data import pairs as pairs_lib
from cpo_jax.data.bad_records import Guard
from cpo_jax.data.bad_records import SkipCounter
from cpo_jax.data.packing import TrimToBucket
from cpo_jax.data.packing import parse_length_buckets
from cpo_jax.data.packing import stack_rows
from cpo_jax.data.processors import Processors
from cpo_jax.knowledge.graph import ConceptGraph
from cpo_jax.knowledge.graph import load_graph


def _indices(
  n: int,
  *,
  seed: int,
  shard_index: int,
  shard_count: int,
  num_epochs: int | None,
  positions=None,
):
  """Per-host slice of the positions (0..n-1, or the record indices `positions`), shuffled
  (seeded) and repeated, reshuffled each epoch: every epoch visits each position once.

  The shuffle comes before the repeat: after an endless repeat Grain shuffles one index range
  of length sys.maxsize, so positions repeat within an epoch and others wait for ages."""
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
  ds = grain.MapDataset.range(n) if positions is None else grain.MapDataset.source(positions)
  ds = ds[shard_index::shard_count]
  return ds.shuffle(seed=seed).repeat(num_epochs)


def _guard_for(n, shard_index, shard_count, num_epochs, policy, skips, max_skipped_share):
  """fn -> Guard(fn): the bad-record policy of a stream over this host's shard of n records.
  On an endless stream (num_epochs=None), one pass over the shard (at most 1000 records)
  decides whether it has anything usable, or it would look for a usable record forever; a
  finite stream ends by itself and leaves the counts to its caller."""
  window = min(len(range(n)[shard_index::shard_count]), 1000) if num_epochs is None else None
  return lambda fn: Guard(fn, policy, skips, window=window, max_skipped_share=max_skipped_share)


def _batched(ds: grain.MapDataset, batch_size: int, read_threads: int = 1) -> grain.IterDataset:
  # Few read threads: the map work is Python (GIL-bound); grain's default 16 threads made it
  # ~2.5x slower on 2 cores. Scale out with worker_count (processes) instead.
  opts = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4 * batch_size)
  it = ds.to_iter_dataset(opts)  # drops the None of skipped records
  return it.batch(batch_size, drop_remainder=True, batch_fn=stack_rows)


def _finish(
  it: grain.IterDataset, worker_count: int, buckets: tuple[int, ...], prefixes: tuple[str, ...]
) -> grain.IterDataset:
  if len(buckets) > 1:
    # Per batch: the rows and their order stay those of the unbucketed stream. Grouping rows
    # of similar length across batches would cut more padding where lengths spread widely,
    # but would make batches length- (so source- and label-) homogeneous, while CPO++
    # normalises its weights per batch.
    it = it.map(TrimToBucket(buckets, prefixes))
  if worker_count > 0:
    # Grain's worker processes read absl flags; outside absl.app they are unparsed.
    from absl import flags

    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return it


def pair_layout_for(thinking_fraction: float, batch_size: int) -> tuple[int, int]:
  """(t, g) of a grouped CPO stream: rows come in groups of g pairs whose first t are thinking
  pairs and the rest perception pairs, so the train step knows statically which rejected
  images repeat their chosen image (it encodes them once). g is the smallest group with
  t / g == thinking_fraction and must divide the (per-host) batch."""
  fraction = fractions.Fraction(thinking_fraction).limit_denominator(batch_size)
  if float(fraction) != float(thinking_fraction) or batch_size % fraction.denominator:
    raise ValueError(
      f"data.thinking_fraction={thinking_fraction} is not t / g with g dividing the batch size "
      f"{batch_size}; choose one that is (0.5, 0.25, ...) or set data.pair_layout='mixed'"
    )
  return fraction.numerator, fraction.denominator


_PAIR_SIDES = ("chosen_", "rejected_")


_PERCEPTION_STREAM = 1000  # seed offset of a grouped stream's perception pairs


class _InterleaveGroups:
  """(thinking batch, perception batch) -> one batch whose rows follow the (t, g) layout."""

  def __init__(self, t: int, g: int):
    self.t, self.g = t, g

  def __call__(self, parts):
    thinking, perception = parts
    groups = thinking["source"].shape[0] // self.t
    out = {}
    for k, a in thinking.items():
      b = perception[k]
      rows_a = (
        a.reshape(groups, self.t, -1, a.shape[-1])
        if k.endswith("pixel_values")
        else a.reshape(groups, self.t, *a.shape[1:])
      )
      rows_b = b.reshape(groups, self.g - self.t, *rows_a.shape[2:])
      rows = np.concatenate([rows_a, rows_b], axis=1)
      out[k] = (
        rows.reshape(-1, a.shape[-1])
        if k.endswith("pixel_values")
        else rows.reshape(-1, *a.shape[1:])
      )
    return out


def make_sft_dataset(
  source,
  proc: Processors,
  *,
  batch_size: int,
  max_len: int,
  seed: int = 0,
  shard_index: int = 0,
  shard_count: int = 1,
  num_epochs: int | None = None,
  on_bad_record: str = "raise",
  max_skipped_share: float = 1.0,
  skips: SkipCounter | None = None,
  worker_count: int = 0,
  length_buckets=(),
) -> grain.IterDataset:
  """SFT batches (see module doc). num_epochs=None repeats forever. `length_buckets` (see
  `parse_length_buckets`): each batch is cut to the smallest bucket that holds its rows."""
  buckets = parse_length_buckets(length_buckets, max_len)
  skips = SkipCounter() if skips is None else skips
  guard = _guard_for(
    len(source), shard_index, shard_count, num_epochs, on_bad_record, skips, max_skipped_share
  )
  ds = _indices(
    len(source),
    seed=seed,
    shard_index=shard_index,
    shard_count=shard_count,
    num_epochs=num_epochs,
  )
  # Pair records: SFT on the chosen side.
  fn = examples.swift_sft_example if examples.gives_pairs(source) else examples.sft_example
  ds = ds.map(guard(functools.partial(fn, source=source, proc=proc, max_len=max_len)))
  return _finish(_batched(ds, batch_size), worker_count, buckets, ("",))


def make_cpo_dataset(
  source,
  proc: Processors,
  *,
  batch_size: int,
  max_len: int,
  seed: int = 0,
  thinking_fraction: float = 0.5,
  perception_mode: str = "hard",
  graph: ConceptGraph | None = None,
  pair_index: pairs_lib.PairIndex | None = None,
  shard_index: int = 0,
  shard_count: int = 1,
  num_epochs: int | None = None,
  on_bad_record: str = "raise",
  max_skipped_share: float = 1.0,
  skips: SkipCounter | None = None,
  worker_count: int = 0,
  length_buckets=(),
  pair_layout: tuple[int, int] | None = None,
  thinking_negative: str = "counterfactual",
  thinking=None,
  max_prompt_len: int = 0,
) -> grain.IterDataset:
  """CPO++ pair batches (see module doc). Each pair is thinking with prob thinking_fraction
  (seeded per position), else perception with `perception_mode` in hard | far | random |
  counterfactual (the last re-renders the chosen scene: synthetic sources only). With
  `pair_layout` (t, g) (`pair_layout_for`) every batch holds exactly that share, in groups.
  `length_buckets` as in `make_sft_dataset`, over both sides of the pairs. `thinking_negative`:
  the thinking pairs' rejected chain, the rewriter's counterfactual or another record's
  (`pairs.random_negative_pair`, the DPO baseline with random negatives). `thinking`: a
  `thinking_pairs.ThinkingPlan` choosing the counterfactual (None: a random rewrite).
  Given pairs (swift_jsonl, mimic_ccf, codalm) take their kind from the records: with
  `pair_layout` (`given_pairs.layout_for`) the stream splits them by cpo_source, and each
  thinking pair must share its image and its prompt of at most `max_prompt_len` tokens
  (data.max_prompt_len, 0 = no bound; a longer one is an OverlongError naming the record)."""
  buckets = parse_length_buckets(length_buckets, max_len)
  if not 0.0 <= thinking_fraction <= 1.0:
    raise ValueError(f"thinking_fraction {thinking_fraction} not in [0, 1]")
  if perception_mode not in pairs_lib.PERCEPTION_MODES:
    raise ValueError(
      f"perception_mode {perception_mode!r}; expected one of {pairs_lib.PERCEPTION_MODES}"
    )
  if thinking_negative not in pairs_lib.THINKING_NEGATIVES:
    raise ValueError(
      f"thinking_negative {thinking_negative!r}; expected one of {pairs_lib.THINKING_NEGATIVES}"
    )
  skips = SkipCounter() if skips is None else skips
  guard = _guard_for(
    len(source), shard_index, shard_count, num_epochs, on_bad_record, skips, max_skipped_share
  )
  where = dict(shard_index=shard_index, shard_count=shard_count, num_epochs=num_epochs)
  if perception_mode == "counterfactual" and not hasattr(source, "counterfactual"):
    raise ValueError(
      f"perception_mode='counterfactual' re-renders the chosen scene with one concept changed; "
      f"dataset {source!r} cannot re-render its images (only synth_drive and synth_cxr can); "
      f"use perception_mode in {pairs_lib.INDEX_MODES}"
    )
  if examples.gives_pairs(source):  # pairs given by the records: no rewriter, no image index
    if thinking is not None:
      raise ValueError(
        f"data.thinking_target / thinking_select choose counterfactuals the pipeline makes, but "
        f"{source!r} gives its own pairs; leave them 'random' for this dataset"
      )
    if thinking_negative != "counterfactual":
      raise ValueError(
        f"thinking_negative={thinking_negative!r} makes pairs from labelled records, but "
        f"{source!r} gives its own pairs; leave it 'counterfactual' for this dataset"
      )
    if pair_layout is None:  # mixed: one stream, the records' kinds in their own shares
      ds = _indices(len(source), seed=seed, **where).map(
        guard(
          functools.partial(examples.swift_cpo_example, source=source, proc=proc, max_len=max_len)
        )
      )
      return _finish(_batched(ds, batch_size), worker_count, buckets, _PAIR_SIDES)
    return _given_pairs_grouped(
      source,
      proc,
      tuple(pair_layout),
      batch_size=batch_size,
      max_len=max_len,
      max_prompt_len=max_prompt_len,
      seed=seed,
      **where,
      guard_for=lambda n: _guard_for(
        n, shard_index, shard_count, num_epochs, on_bad_record, skips, max_skipped_share
      ),
      finish=lambda it: _finish(it, worker_count, buckets, _PAIR_SIDES),
    )
  graph = graph or load_graph(getattr(source, "domain", "driving"))
  if perception_mode != "counterfactual":  # counterfactual negatives need no index over the split
    pair_index = pair_index or pairs_lib.PairIndex.from_source(source)

  def pairs(fraction, stream):
    return _indices(len(source), seed=seed + stream, **where).random_map(
      guard(
        functools.partial(
          examples.cpo_example,
          source=source,
          proc=proc,
          graph=graph,
          index=pair_index,
          max_len=max_len,
          thinking_fraction=fraction,
          perception_mode=perception_mode,
          thinking_negative=thinking_negative,
          thinking=thinking,
        )
      ),
      seed=seed + 1 + stream,
    )

  if pair_layout is not None and tuple(pair_layout) != pair_layout_for(
    thinking_fraction, batch_size
  ):
    raise ValueError(
      f"pair_layout {pair_layout} does not match thinking_fraction {thinking_fraction} and "
      f"batch size {batch_size}; expected {pair_layout_for(thinking_fraction, batch_size)}"
    )
  t, g = pair_layout or (0, 1)
  if t in (0, g):  # mixed, or one kind only: nothing to interleave
    return _finish(
      _batched(pairs(thinking_fraction, 0), batch_size), worker_count, buckets, _PAIR_SIDES
    )
  # Two streams, each over the whole (shuffled) split: thinking pairs and perception pairs.
  zipped = _interleaved(pairs(1.0, 0), pairs(0.0, _PERCEPTION_STREAM), t, g, batch_size)
  return _finish(zipped, worker_count, buckets, _PAIR_SIDES)


def _interleaved(thinking, rest, t, g, batch_size, strict=True):
  """Two streams of pair rows batched by their share of the batch and interleaved group by
  group into the (t, g) layout. strict=False: a finite pass ends with the shorter stream."""
  groups = batch_size // g
  zipped = grain.experimental.ZipIterDataset(
    parents=[_batched(thinking, groups * t), _batched(rest, groups * (g - t))], strict=strict
  )
  return zipped.map(_InterleaveGroups(t, g))


def _given_pairs_grouped(
  source, proc, layout, *, batch_size, max_len, max_prompt_len, guard_for, finish, **where
):
  """Given pairs in the (t, g) layout: a thinking stream and a perception/other stream over
  the records of each kind (`given_pairs`), each shuffled, sharded and repeated on its own
  (`where`: seed, shard_index, shard_count, num_epochs). Thinking rows are checked to share
  their image and prompt, of at most max_prompt_len tokens (0 = no bound)."""
  t, g = layout
  if batch_size % g:
    raise ValueError(f"pair_layout {layout}: groups of {g} do not divide the batch {batch_size}")
  thinking, rest = given_pairs.stream_positions(source, layout)
  shard, shards = where["shard_index"], where["shard_count"]

  def stream(positions, name, seed_offset, **check):
    if not len(positions[shard::shards]):
      raise ValueError(
        f"{source!r}: this host's share (shard {shard} of {shards}) holds none of its "
        f"{len(positions)} {name} pairs; the grouped layout needs some on every host"
      )
    ds = _indices(
      len(positions),
      positions=positions.tolist(),
      **dict(where, seed=where["seed"] + seed_offset),
    )
    example = functools.partial(
      examples.swift_cpo_example, source=source, proc=proc, max_len=max_len, **check
    )
    return ds.map(guard_for(len(positions))(example))

  think = lambda: stream(thinking, "thinking", 0, max_prompt_len=int(max_prompt_len or 0))
  other = lambda: stream(rest, "perception or other", _PERCEPTION_STREAM)
  if t == g:
    return finish(_batched(think(), batch_size))
  if t == 0:
    return finish(_batched(other(), batch_size))
  # The kinds have their own sizes: with num_epochs set, the pass ends with the shorter one.
  return finish(_interleaved(think(), other(), t, g, batch_size, strict=False))


def make_sft_iterator(source, proc: Processors, **kw) -> grain.DatasetIterator:
  """Iterator over SFT batches; `.get_state()` / `.set_state()` for checkpoint + resume."""
  return iter(make_sft_dataset(source, proc, **kw))


def make_cpo_iterator(source, proc: Processors, **kw) -> grain.DatasetIterator:
  """Iterator over CPO batches; `.get_state()` / `.set_state()` for checkpoint + resume."""
  return iter(make_cpo_dataset(source, proc, **kw))


def chosen_side(batch: dict) -> dict:
  """A CPO batch's chosen rows as an SFT batch: the same images (re-rendered scenes
  included), prompts and completions, in the same rows."""
  out = {k: batch[f"chosen_{k}"] for k in ("input_ids", "attention_mask", "loss_mask")}
  out.update(
    pixel_values=batch["chosen_pixel_values"],
    image_grid_thw=batch["image_grid_thw"],
    prompt_length=batch["prompt_length"],
    decision=batch["chosen_decision"],
    index=batch["index"],
  )
  return out


def make_chosen_sft_iterator(source, proc: Processors, **kw) -> grain.DatasetIterator:
  """SFT batches of the chosen sides of `make_cpo_dataset(source, proc, **kw)`'s pairs (the
  control that sees exactly what CPO++ prefers, without the rejected side); resumable."""
  return iter(make_cpo_dataset(source, proc, **kw).map(chosen_side))
