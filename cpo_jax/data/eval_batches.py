"""Eval and drift-probe batches: left-padded prompts (or prompt + chain + answer prefix) with gold labels.

Eval batch: input_ids [B,Lp] LEFT padded prompts ending with '<|im_start|>assistant\\n',
  attention_mask [B,Lp], pixel_values, image_grid_thw, decision [B] (gold), concepts [B,C],
  nuisance [B], boxes [B,C,4], index [B], valid [B] bool (False on rows that only fill the
  last batch to the static size).
"""

from __future__ import annotations

import functools
import json
from typing import Iterator

import numpy as np

from cpo_jax.data import examples
from cpo_jax.data import pairs as pairs_lib
from cpo_jax.data.bad_records import BadRecordError
from cpo_jax.data.bad_records import Guard
from cpo_jax.data.bad_records import OverlongError
from cpo_jax.data.bad_records import SkipCounter
from cpo_jax.data.packing import pack_left
from cpo_jax.data.packing import stack_rows
from cpo_jax.data.processors import Processors
from cpo_jax.knowledge.graph import ConceptGraph
from cpo_jax.knowledge.graph import load_graph


def gold_completion(source, rec) -> str:
  """The record's reference answer: the chosen side of a given pair, else chain + answer."""
  return rec["chosen"] if examples.gives_pairs(source) else pairs_lib.completion_of(rec)


def prompt_ids(source, rec, proc: Processors) -> tuple[int, ...]:
  n_image = proc.num_image_tokens(proc.static_grid)
  if examples.gives_pairs(source):
    return proc.prompt_ids_from_json(json.dumps(rec["prompt_messages"]), n_image)
  return proc.prompt_ids(pairs_lib.as_text(rec["question"]), n_image)


def _checked(i: int, *, source, proc: Processors, max_prompt_len: int | None):
  """(record, its id, pixel values, grid, prompt ids) of record i; raises BadRecordError naming
  the record (unreadable, missing field, bad image, unknown words, prompt over max_prompt_len)."""
  if examples.gives_pairs(source):  # pair sources check their own records
    rec = source[i]
    rid = rec["record_id"]
  else:
    rec, rid = examples.read_record(source, i), f"{source!r}[{i}]"
  pv, grid = examples.checked_image(proc, rec["image"], rid, proc.static_grid)
  prompt = prompt_ids(source, rec, proc)
  if proc.tokenizer.unk_token_id in prompt:
    raise BadRecordError("unknown_token", rid, "prompt has words outside the tokenizer vocabulary")
  if max_prompt_len is not None and len(prompt) > max_prompt_len:
    raise OverlongError(
      rid, f"prompt of {len(prompt)} tokens > eval.max_prompt_len {max_prompt_len}"
    )
  return rec, rid, pv, grid, prompt


def eval_lengths(
  source,
  proc: Processors,
  *,
  max_examples: int | None = None,
  max_prompt_len: int | None = None,
  on_bad_record: str = "raise",
  max_skipped_share: float = 1.0,
) -> tuple[int, int]:
  """(longest prompt, longest gold completion incl. the closing <|im_end|>) in tokens over the
  records an eval of `source` reads: one checked pass, so a split whose records are all bad
  (or more than `max_skipped_share` of them) stops here, before any training."""
  n = len(source) if max_examples is None else min(max_examples, len(source))

  def lengths(i):
    rec, rid, _, _, prompt = _checked(i, source=source, proc=proc, max_prompt_len=max_prompt_len)
    completion = proc.completion_ids(gold_completion(source, rec))
    return len(prompt), len(completion)

  guard = Guard(
    lengths,
    on_bad_record,
    SkipCounter(),
    window=max(1, min(n, 1000)),
    max_skipped_share=max_skipped_share,
  )
  found = [x for x in map(guard, range(n)) if x is not None]
  return max((p for p, _ in found), default=0), max((c for _, c in found), default=0)


def eval_row(i: int, *, source, proc: Processors, graph: ConceptGraph, max_prompt_len: int):
  """One eval row (raises BadRecordError naming the record). Ingested pairs evaluate on the
  chosen side: the gold decision is the record's own where it carries one (mimic_ccf's labels,
  codalm's parsed suggestion), else read from the chosen text with the graph (swift_jsonl);
  -1 (unlabelled, never scored) where there is none. Their concepts are read from the text."""
  rec, rid, pv, grid, prompt = _checked(i, source=source, proc=proc, max_prompt_len=max_prompt_len)
  ids, attn = pack_left(prompt, max_prompt_len, proc.ids["pad_token_id"], rid)
  row = {"input_ids": ids, "attention_mask": attn, "pixel_values": pv, "image_grid_thw": grid}
  if examples.gives_pairs(source):
    from cpo_jax.knowledge import free_text

    if "decision" in rec:
      decision = int(rec["decision"])
    else:
      d = graph.parse_decision(rec["chosen"])
      decision = -1 if d is None else graph.decision_id(d)
    a, _ = free_text.parse_report(graph, rec["chosen"])
    S = proc.image_size
    return dict(
      row,
      decision=np.int32(decision),
      concepts=np.asarray(graph.value_ids(a), np.int32),
      nuisance=np.int32(-1),
      boxes=np.array([[0, 0, S, S]], np.int32),
      index=np.int32(i),
    )
  return dict(
    row,
    decision=np.int32(rec["decision"]),
    concepts=np.asarray(rec["concepts"], np.int32),
    nuisance=np.int32(rec["nuisance"]),
    boxes=proc.boxes_for(rec["boxes"], rec["image"]),
    index=np.int32(i),
  )


def make_eval_batches(
  source,
  proc: Processors,
  *,
  batch_size: int,
  max_prompt_len: int,
  max_examples: int | None = None,
  shard_index: int = 0,
  shard_count: int = 1,
  graph: ConceptGraph | None = None,
  on_bad_record: str = "raise",
  skips: SkipCounter | None = None,
  max_skipped_share: float = 1.0,
) -> Iterator[dict[str, np.ndarray]]:
  """Left-padded prompts in source order (+ gold labels); the last batch is filled to the
  static size by repeating its first row with valid=False. `graph` (default: the source's
  domain, medical for ingested pairs) is only used to read labels from ingested pairs.
  With shard_count > 1, only every shard_count-th record from shard_index (one host's share
  of a data-parallel eval; `index` keeps the record's place in the split).

  Bad records follow `on_bad_record` (skips counted in `skips`); a split whose records are all
  skipped, or more than `max_skipped_share` of them, stops with the counts (never an empty eval
  reported as a result)."""
  graph = graph or load_graph(getattr(source, "domain", None) or "medical")
  n = len(source) if max_examples is None else min(max_examples, len(source))
  positions = list(range(n))[shard_index::shard_count]
  make_row = Guard(
    functools.partial(
      eval_row, source=source, proc=proc, graph=graph, max_prompt_len=max_prompt_len
    ),
    on_bad_record,
    skips if skips is not None else SkipCounter(),
    window=max(1, min(len(positions), 1000)),
    max_skipped_share=max_skipped_share,
  )
  rows = []
  for i in positions:
    row = make_row(i)
    if row is not None:
      rows.append(dict(row, valid=np.bool_(True)))
    if len(rows) == batch_size:
      yield stack_rows(rows)
      rows = []
  if rows:
    while len(rows) < batch_size:
      rows.append(dict(rows[0], valid=np.bool_(False)))
    yield stack_rows(rows)


def blank_batch(proc: Processors, *, batch_size: int, max_prompt_len: int):
  """An eval batch of `batch_size` invalid rows (valid=False, index and decision -1): a prompt
  of the eval shape with a black image. A host that has run out of eval rows decodes it while
  the others finish theirs (generate on a mesh is collective)."""
  side = proc.image_size
  pv, grid = proc.image_inputs(np.zeros((side, side, 3), np.uint8))
  prompt = proc.prompt_ids("", proc.num_image_tokens(grid))
  ids, attn = pack_left(prompt, max_prompt_len, proc.ids["pad_token_id"], "blank eval row")
  row = {
    "input_ids": ids,
    "attention_mask": attn,
    "pixel_values": pv,
    "image_grid_thw": grid,
    "decision": np.int32(-1),
    "index": np.int32(-1),
    "valid": np.bool_(False),
  }
  return stack_rows([row] * batch_size)


def decision_token_ids(proc: Processors, graph: ConceptGraph) -> np.ndarray:
  """[num_decisions] id of each decision's first answer token (' stop', ' slow', ...), in
  graph.decisions order: the next-token distribution over these after the answer prefix is the
  outcome distribution (for AUC and the drift probe)."""
  ids = [
    proc.tokenizer(" " + graph.decision_texts[d], add_special_tokens=False)["input_ids"][0]
    for d in graph.decisions
  ]
  if len(set(ids)) != len(ids):
    raise ValueError(f"decisions share a first token: {dict(zip(graph.decisions, ids))}")
  return np.asarray(ids, np.int32)


def make_probe_batches(
  source,
  proc: Processors,
  *,
  kind: str,
  batch_size: int,
  max_len: int,
  max_examples: int | None = None,
  seed: int = 0,
  graph: ConceptGraph | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """Teacher-forced drift-probe inputs: prompt + chain (kind 'none' = the gold chain,
  'synonym' / 'contradict' = one concept sentence edited, see knowledge/drift.py) + the answer
  prefix, LEFT padded to max_len, so logits[:, -1] over decision_token_ids is the outcome
  distribution. Same example order for every kind (pair them by row).
  Keys: input_ids, attention_mask [B,max_len], pixel_values, image_grid_thw, decision (gold),
  expected_decision (the rule's decision for the edited chain), index, valid."""
  from cpo_jax.knowledge import drift

  graph = graph or load_graph(getattr(source, "domain", "driving"))
  prefix = drift.answer_prefix(graph)
  n = len(source) if max_examples is None else min(max_examples, len(source))
  pad = proc.ids["pad_token_id"]
  for s in range(0, n, batch_size):
    rows = []
    for i in range(s, min(n, s + batch_size)):
      rec = source[i]
      a = graph.assignment_from_ids(rec["concepts"])
      if kind == "none":
        chain, expected = pairs_lib.as_text(rec["chain"]), graph.decisions[int(rec["decision"])]
      else:
        e = drift.edit_chain(graph, a, kind, np.random.default_rng([seed, i]))
        chain, expected = e.chain, e.expected_decision
      pv, grid = proc.image_inputs(rec["image"])
      prompt = proc.prompt_ids(pairs_lib.as_text(rec["question"]), proc.num_image_tokens(grid))
      body = tuple(proc.tokenizer(f"{chain} {prefix}", add_special_tokens=False)["input_ids"])
      ids, attn = pack_left(prompt + body, max_len, pad, f"{source!r}[{i}] ({kind} probe)")
      rows.append(
        {
          "input_ids": ids,
          "attention_mask": attn,
          "pixel_values": pv,
          "image_grid_thw": grid,
          "decision": np.int32(rec["decision"]),
          "expected_decision": np.int32(graph.decision_id(expected)),
          "index": np.int32(i),
          "valid": np.bool_(True),
        }
      )
    while len(rows) < batch_size:
      rows.append(dict(rows[0], valid=np.bool_(False)))
    yield stack_rows(rows)
