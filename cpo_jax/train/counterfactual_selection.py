"""Reference-picked counterfactuals (data.thinking_select='reference'): one pass before CPO++.

For every record of this process's shard, up to K minimal rewrites of its chain
(`rewriter.candidate_rewrites`, K = data.thinking_candidates, seeded by (seed, position)) are
scored by the reference, the SFT model (at the start of the stage the policy equals it), as
log pi_ref(y- | image, prompt): the summed completion log-prob the loss uses. The 2 most
probable are kept (`thinking_pairs.SelectionTable`): the counterfactuals the model finds most
plausible, so the pairs push hardest where it is least sure. Rows (image + prompt + one
candidate) are batched over the mesh like a train step's, forward only.

Stored per process as .npz (plain arrays, read without pickle) under <workdir>/selection/
every `save_every` batches; a pass cut short resumes from the stored rows. The candidate plan
is recomputed from the data and its digest must match the file's, else the file was made for
other data and that is an error, never a silent mix. Not done (issue 12's stretch): refreshing
the choice with the policy as training goes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io

from absl import logging
from flax import nnx
import jax
from jax.experimental import multihost_utils
import numpy as np
import tqdm

from cpo_jax import paths
from cpo_jax import sharding
from cpo_jax.data import examples
from cpo_jax.data import pairs as pairs_lib
from cpo_jax.data import thinking_pairs
from cpo_jax.data.bad_records import BadRecordError
from cpo_jax.data.packing import TrimToBucket
from cpo_jax.data.packing import pack_right
from cpo_jax.data.packing import parse_length_buckets
from cpo_jax.data.packing import stack_rows
from cpo_jax.knowledge.rewriter import candidate_rewrites
from cpo_jax.train import completion
from cpo_jax.train import objectives
from cpo_jax.train import stages

CANDIDATE_STREAM = 7919  # keeps the candidate draws apart from the pipeline's seeded streams


@dataclasses.dataclass(frozen=True)
class CandidatePlan:
  """What the pass scores: positions [M] of the shard, their concepts [M, C], candidates
  [M, K, C] (concept value ids, -1 padded) and the scoring order rows [R, 2] = (m, j)."""

  positions: np.ndarray
  record_concepts: np.ndarray
  candidates: np.ndarray
  rows: np.ndarray

  def digest(self) -> np.uint64:
    h = hashlib.blake2b(digest_size=8)
    for a in (self.positions, self.record_concepts, self.candidates):
      h.update(np.ascontiguousarray(a, np.int64).tobytes())
    return np.uint64(int.from_bytes(h.digest(), "little"))


def shard_positions(n: int, shard_index: int = 0, shard_count: int = 1) -> np.ndarray:
  """The positions this process's pipeline reads (datasets._indices' slice)."""
  return np.arange(n)[shard_index::shard_count]


def candidate_plan(graph, positions, concepts, *, k: int, seed: int) -> CandidatePlan:
  """Candidates of every record (concepts [M, C] of the records at `positions`)."""
  concepts = np.asarray(concepts, np.int64).reshape(len(positions), -1)
  cands = np.full((len(positions), k, concepts.shape[1]), -1, np.int64)
  rows = []
  for m, (p, ids) in enumerate(zip(positions, concepts)):
    rng = np.random.default_rng([seed, CANDIDATE_STREAM, int(p)])
    for j, b in enumerate(candidate_rewrites(graph, graph.assignment_from_ids(ids), k=k, seed=rng)):
      cands[m, j] = graph.value_ids(b)
      rows.append((m, j))
  return CandidatePlan(np.asarray(positions, np.int64), concepts, cands, np.asarray(rows, np.int64))


def shard_concepts(source, positions) -> np.ndarray:
  """Concept ids [M, C] of the records at `positions`, without rendering where possible."""
  if hasattr(source, "labels"):
    return np.asarray(source.labels()[1])[positions]
  return np.stack([np.asarray(examples.read_record(source, int(p))["concepts"]) for p in positions])


def scene_concepts(source, graph, positions, scenes=None) -> tuple[np.ndarray, dict[int, dict]]:
  """Concept ids [M, C] of the scenes the pairs at `positions` choose, and {position: the
  assignment its scene is re-rendered with}: under data.thinking_target='balanced' (`scenes`,
  its ThinkingPlan) some records are re-rendered, and their candidates rewrite the new scene."""
  concepts = shard_concepts(source, positions).astype(np.int64)
  if scenes is None or scenes.target != "balanced":
    return concepts, {}
  decision, nuisance = thinking_pairs.split_labels(source)
  rerendered = {}
  for m, p in enumerate(positions):
    b = scenes.balanced_scene(int(decision[p]), int(nuisance[p]), concepts[m], int(p), graph)
    if b is not None:
      concepts[m], rerendered[int(p)] = graph.value_ids(b), b
  return concepts, rerendered


class _Rows:
  """Builds the scoring rows: image + prompt + a candidate's completion, right padded. The image
  is the record's, or its re-rendering's (`rerendered`: position -> assignment)."""

  def __init__(self, source, proc, graph, max_len, on_bad_record, skips, rerendered):
    self.source, self.proc, self.graph, self.max_len = source, proc, graph, max_len
    self.rerendered = rerendered
    self.on_bad_record, self.skips = on_bad_record, skips
    self._record = (None, None)  # (position, (pixel values, grid, prompt)) of the last record
    pv, grid = proc.image_inputs(np.zeros((proc.image_size, proc.image_size, 3), np.uint8))
    prompt = proc.prompt_ids(graph.question, proc.num_image_tokens(grid))
    answer = proc.completion_ids(graph.answer_text(graph.default))
    self.filler = self._row(pv, grid, prompt, answer, "filler row")  # scored, then dropped

  def _row(self, pv, grid, prompt, completion_ids, rid):
    pad, unk = self.proc.ids["pad_token_id"], self.proc.tokenizer.unk_token_id
    ids, attn, loss = pack_right(prompt, completion_ids, self.max_len, pad, rid, unk)
    return dict(
      input_ids=ids, attention_mask=attn, loss_mask=loss, pixel_values=pv, image_grid_thw=grid
    )

  def __call__(self, position: int, candidate_ids) -> dict | None:
    """The row of a candidate, or None (counted) for a bad record under on_bad_record='skip'."""
    rid = f"{self.source!r}[{position}]"
    try:
      if self._record[0] != position:
        self._record = (position, None)  # a bad record is counted once, not per candidate
        rec = examples.read_record(self.source, position)
        if position in self.rerendered:
          cf = self.source.counterfactual(position, self.rerendered[position])
          rec = dict(rec, image=cf["image"])
        pv, grid = examples.checked_image(self.proc, rec["image"], rid)
        question = pairs_lib.as_text(rec["question"])
        prompt = self.proc.prompt_ids(question, self.proc.num_image_tokens(grid))
        self._record = (position, (pv, grid, prompt))
      if self._record[1] is None:
        return None
      pv, grid, prompt = self._record[1]
      text = self.graph.completion_text(self.graph.assignment_from_ids(candidate_ids))
      return self._row(pv, grid, prompt, self.proc.completion_ids(text), f"{rid} candidate")
    except BadRecordError as e:
      if self.on_bad_record == "raise":
        raise
      if self.skips is not None:
        self.skips.add(e.reason, e.record_id)
      return None


def select_counterfactuals(
  model,
  *,
  source,
  proc,
  graph,
  grid,
  mesh,
  k: int,
  seed: int,
  rows_per_batch: int,
  max_len: int,
  path,
  max_completion_len: int = 0,
  length_buckets=(),
  save_every: int = 50,
  on_bad_record: str = "raise",
  skips=None,
  shard_index: int = 0,
  shard_count: int = 1,
  scenes: thinking_pairs.ThinkingPlan | None = None,
) -> thinking_pairs.SelectionTable:
  """The selection of this process's shard: read from `path`, or scored (resuming a pass cut
  short) and stored there. `model` is the reference; rows_per_batch is global (all processes).
  `scenes`: the plan that picks the pairs' scenes (data.thinking_target='balanced'), or None."""
  path = paths.path(path)
  positions = shard_positions(len(source), shard_index, shard_count)
  concepts, rerendered = scene_concepts(source, graph, positions, scenes)
  plan = candidate_plan(graph, positions, concepts, k=k, seed=seed)
  digest, done = plan.digest(), np.zeros((0,), np.float32)
  if path.exists():
    with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as f:
      if np.uint64(f["digest"]) != digest:
        raise ValueError(
          f"{path} was selected for other records or candidates (data, seed, shard or "
          "data.thinking_candidates changed since); delete it to select again."
        )
      done = f["row_scores"]
    if len(done) < len(plan.rows):
      logging.warning("%s has %d of %d rows; resuming.", path, len(done), len(plan.rows))
  if len(done) == len(plan.rows):
    return table_from_scores(plan, done, str(path))
  done = _score(
    model,
    plan,
    done,
    rows=_Rows(source, proc, graph, max_len, on_bad_record, skips, rerendered),
    grid=grid,
    mesh=mesh,
    rows_per_batch=rows_per_batch,
    max_completion_len=max_completion_len,
    trim=TrimToBucket(parse_length_buckets(length_buckets, max_len), ("",)),
    store=functools.partial(_store, path, digest),
    save_every=save_every,
  )
  table = table_from_scores(plan, done, str(path))
  _store(path, digest, done, table)
  _log_selection(table)
  return table


def table_from_scores(plan: CandidatePlan, row_scores, path: str = ""):
  """The SelectionTable: per record the SELECTED_PER_RECORD candidates of highest score (NaN =
  not scored; ties go to the earlier candidate)."""
  m, k, c = plan.candidates.shape
  scores = np.full((m, k), np.nan, np.float32)
  scores[plan.rows[:, 0], plan.rows[:, 1]] = row_scores
  keep = min(thinking_pairs.SELECTED_PER_RECORD, k)
  order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), axis=1, kind="stable")[:, :keep]
  picked = np.take_along_axis(np.isfinite(scores), order, 1)
  chosen = np.where(picked[..., None], np.take_along_axis(plan.candidates, order[..., None], 1), -1)
  return thinking_pairs.SelectionTable(
    plan.positions, plan.record_concepts, chosen, plan.candidates, scores, path
  )


def _store(path, digest, row_scores, table=None):
  arrays = dict(digest=np.asarray(digest, np.uint64), row_scores=np.asarray(row_scores, np.float32))
  if table is not None:  # the finished selection, for a reader of the file
    arrays.update(
      positions=table.positions,
      chosen=table.chosen,
      candidates=table.candidates,
      scores=table.scores,
    )
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  paths.write_bytes_whole(path, buf.getvalue())  # whole or absent, never half-written


def _log_selection(table):
  """How far the kept candidates stand above the others (mean reference log-prob)."""
  scores = table.scores
  kept = np.zeros(scores.shape, bool)
  order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), axis=1, kind="stable")
  np.put_along_axis(kept, order[:, : table.chosen.shape[1]], True, 1)
  finite = np.isfinite(scores)
  logging.warning(
    "reference-picked counterfactuals (%s): %d records, %.1f candidates each on average; mean "
    "reference log-prob of the kept %.2f, of the others %.2f",
    table.path,
    len(scores),
    finite.sum() / max(len(scores), 1),
    np.mean(scores[kept & finite]) if (kept & finite).any() else np.nan,
    np.mean(scores[~kept & finite]) if (~kept & finite).any() else np.nan,
  )


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _score_rows(graphdef, state, batch, grid, num_positions):
  """Summed completion log-prob of each row (module level: one compile per shape and model)."""
  model = nnx.merge(graphdef, state)
  return objectives.sft_logps(model, batch, np.asarray(grid), num_positions).total


def _score(
  model,
  plan,
  done,
  *,
  rows,
  grid,
  mesh,
  rows_per_batch,
  max_completion_len,
  trim,
  store,
  save_every,
):
  """Row scores [R] (NaN for skipped rows), continuing after the `done` ones."""
  local_dp = max(1, mesh.shape["data"] * mesh.shape["fsdp"] // jax.process_count())
  per_batch = max(local_dp, rows_per_batch // jax.process_count() // local_dp * local_dp)
  todo = plan.rows[len(done) :]
  num_batches = -(-len(todo) // per_batch)
  if jax.process_count() > 1:  # every process runs the same number of (collective) steps
    num_batches = int(np.max(multihost_utils.process_allgather(np.int32(num_batches))))
  grid_key = tuple(int(x) for x in np.asarray(grid))
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, sharding.state_shardings(state, mesh))  # no-op when placed
  slab = lambda length: completion.completion_positions(length, grid, model, max_completion_len)

  out, pending = [np.asarray(done, np.float32)], None

  def collect():  # the previous batch's scores: fetched after the next one is dispatched
    valid, n, scored = pending
    out.append(np.where(valid, sharding.process_rows(scored), np.nan)[:n].astype(np.float32))

  for b in tqdm.tqdm(
    range(num_batches),
    desc="reference-scored counterfactuals",
    unit="batch",
    dynamic_ncols=True,
    disable=jax.process_index() != 0,
  ):
    chunk = todo[b * per_batch : (b + 1) * per_batch]
    built = [rows(int(plan.positions[m]), plan.candidates[m, j]) for m, j in chunk]
    built += [None] * (per_batch - len(built))  # the last batch: filler rows, dropped
    batch = trim(stack_rows([r or rows.filler for r in built]))
    num_positions = slab(batch["input_ids"].shape[1])
    completion.check_completion_lengths(batch, num_positions)
    inputs = sharding.global_batch(stages.step_inputs(batch, grid, model.config), mesh)
    scored = _score_rows(graphdef, state, inputs, grid_key, num_positions)
    if pending is not None:
      collect()
    pending = (np.array([r is not None for r in built]), len(chunk), scored)
    if b % save_every == 0 and b:
      store(np.concatenate(out))  # a pass cut here resumes from these rows
  if pending is not None:
    collect()
  return np.concatenate(out)


def for_run(model, cfg, data, *, mesh, workdir, skips=None):
  """The run's selection (None unless data.thinking_select='reference'), from the SFT model.
  Rows per batch: one CPO++ micro-step's (2 rows per pair), which the train step fits."""
  if cfg.data.thinking_select != "reference":
    return None
  d = cfg.data
  thinking_pairs.check_choice(d.thinking_target, d.thinking_select, d.thinking_negative)
  accum = max(1, int(cfg.cpo.grad_accum_steps))
  source = data.cpo_source  # the CPO++ stage's records (data.cpo_scenes)
  return select_counterfactuals(
    model,
    source=source,
    scenes=thinking_pairs.plan_for(source, data.graph, target=d.thinking_target),
    proc=data.processors,
    graph=data.graph,
    grid=data.grid,
    mesh=mesh,
    k=cfg.data.thinking_candidates,
    seed=cfg.seed,
    rows_per_batch=max(1, 2 * cfg.cpo.batch_size // accum),
    max_len=cfg.data.max_len,
    max_completion_len=cfg.data.max_completion_len,
    length_buckets=data.length_buckets,
    path=paths.join(workdir, "selection", f"thinking.process{jax.process_index()}.npz"),
    save_every=cfg.checkpoint.every_steps,
    on_bad_record=cfg.data.on_bad_record,
    skips=skips if skips is not None else data.skips,
    **data.shard,
  )
