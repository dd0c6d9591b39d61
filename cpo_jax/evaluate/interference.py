"""Interference curves (METHOD.md section 5): accuracy under perception and thinking interference.

Perception interference transforms the eval batches' pixel_values (the masks of
cpo_jax.perturb, or part of another eval image whose gold decision differs) and decodes
greedily through `answers.predict_decisions`, so accuracy is measured exactly as for the
clean splits. Thinking interference edits the chain (`chain_edits`: graph sentences, or on real
data the record's own chain in place) and reads the answer distribution
(`scoring.AnswerScorer`). Report contract (DESIGN.md):
`interference.<kind>.<severity>` is an accuracy (the return of `interference_report`).

Random masks draw per row from the record index (not the batch), so a cell does not depend on
how the split is batched or shared over hosts: with `blank`, each host reads, perturbs, decodes
and scores its own share, and the cells are those of one process reading the whole split.
`image_swap` takes its donors from the batch and earlier batches, so it reads the whole split
on every host (its calls still split the rows over the mesh).
"""

from __future__ import annotations

import functools
from typing import Callable
from typing import Iterable
from typing import Mapping
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cpo_jax import perturb
from cpo_jax.evaluate import answers
from cpo_jax.evaluate import chain_edits
from cpo_jax.evaluate import hosts
from cpo_jax.evaluate.scoring import AnswerScorer
from cpo_jax.evaluate.scoring import mean_or_none
from cpo_jax.knowledge.graph import ConceptGraph

PERCEPTION_KINDS = ('occlude', 'mask_patches', 'noise', 'blur', 'image_swap')


THINKING_KINDS = ('synonym', 'contradict')


# Perception severities are in [0, 1] (see perturb.py; image_swap: share of image tokens taken
# from the other image). Thinking severities are the number of concept sentences edited.
DEFAULT_SEVERITIES = {
  'occlude': (0.5, 1.0),
  'mask_patches': (0.25, 0.5),
  'noise': (0.1, 0.3),
  'blur': (0.5, 1.0),  # sigma 2 and 4 px: synth_drive's colour cues survive less blur
  'image_swap': (0.5, 1.0),
  'synonym': (1, 2),
  'contradict': (1,),
}


def perturb_batch(batch, kind: str, severity: float, rng, *, layout: perturb.PatchLayout):
  """The eval batch with masked pixel_values (kinds of perturb.PERCEPTION_MASKS).

  occlude uses the batch's evidence boxes, in pixels of the processed image (the pipeline
  rescales them when it resizes an image). A random mask draws each row's from `rng` folded
  with the row's record index: the same row gets the same mask in any batch.
  """
  grid = perturb.grid_of(batch['image_grid_thw'])
  pixels = jnp.asarray(batch['pixel_values'])
  if kind == 'occlude':
    boxes = jnp.asarray(batch['boxes'], jnp.float32)
    out = perturb.occlude_boxes(rng, pixels, grid, boxes, severity, layout=layout)
  elif kind == 'blur':  # deterministic
    out = perturb.gaussian_blur(rng, pixels, grid, None, severity, layout=layout)
  elif kind in ('mask_patches', 'noise'):
    mask = functools.partial(
      perturb.PERCEPTION_MASKS[kind], grid=grid, boxes=None, severity=severity, layout=layout
    )
    index = np.asarray(batch['index']).astype(np.uint32)  # -1 (blank rows) wraps
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, index)
    rows = pixels.reshape(len(index), -1, pixels.shape[-1])
    out = jax.vmap(mask)(keys, rows).reshape(pixels.shape)
  else:
    raise ValueError(
      f'perturb_batch: kind {kind!r}; expected one of '
      f'{("occlude", "mask_patches", "noise", "blur")} (image_swap: swap_images)'
    )
  return dict(batch, pixel_values=np.asarray(out))


def swap_images(
  batch, severity: float, rng: np.random.Generator, pool: dict, *, layout: perturb.PatchLayout
):
  """Replaces a `severity` share of each image's tokens (merge windows, random) by the same
  tokens of a donor image whose gold decision differs; 1.0 swaps the whole image.

  Donors come from the batch, else from `pool` (decision -> one image's rows from earlier
  batches; updated here). Rows with no donor yet are marked invalid (not scored).
  Returns (batch, donor decision per row, -1 where none).
  """
  grid = perturb.grid_of(batch['image_grid_thw'])
  decision = np.asarray(batch['decision'])
  valid = np.asarray(batch['valid'], bool)
  b = len(decision)
  x = np.asarray(batch['pixel_values']).reshape(b, -1, layout.patch_dim)
  donors, donor_decision, keep = x.copy(), np.full(b, -1, np.int64), valid.copy()
  for i in range(b):
    in_batch = [j for j in range(b) if valid[j] and decision[j] != decision[i]]
    pooled = [d for d in sorted(pool) if d != decision[i]]
    if in_batch:
      j = in_batch[int(rng.integers(len(in_batch)))]
      donors[i], donor_decision[i] = x[j], decision[j]
    elif pooled:
      d = pooled[int(rng.integers(len(pooled)))]
      donors[i], donor_decision[i] = pool[d], d
    else:
      keep[i] = False
  for j in np.flatnonzero(valid):
    pool[int(decision[j])] = x[j].copy()
  group = layout.merge_size**2  # one LLM image token = merge_size**2 consecutive rows
  units = int(np.prod(grid)) // group
  k = int(round(float(np.clip(severity, 0.0, 1.0)) * units))
  chosen = np.stack([rng.permutation(units) < k for _ in range(b)])
  chosen = np.repeat(chosen, group, axis=1)[:, :, None]
  out = np.where(chosen, donors, x).reshape(np.shape(batch['pixel_values']))
  return dict(batch, pixel_values=out.astype(np.float32), valid=keep), donor_decision


def _perturbed_batches(batches, kind, severity, key, *, layout, donors):
  """Applies one interference to every batch; collects the swap donors' decisions of scored rows."""
  pool = {}
  swap_rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).astype(np.uint64).tolist())
  for batch in batches:
    if kind == 'image_swap':
      batch, donor = swap_images(batch, severity, swap_rng, pool, layout=layout)
      donors.extend(donor[np.asarray(batch['valid'], bool)].tolist())
    else:
      batch = perturb_batch(batch, kind, severity, key, layout=layout)
    yield batch


def interference_details(
  model,
  batches_fn: Callable[..., Iterable[dict]],
  *,
  processors,
  graph: ConceptGraph,
  kinds_and_severities: Mapping[str, Sequence] | None = None,
  max_new_tokens: int,
  rng_seed: int = 0,
  scorer=None,
  source=None,
  blank: Callable[[], dict] | None = None,
):
  """Every interference cell with its diagnostics: {kind: {str(severity): cell}}.

  'none' -> {'0': clean greedy accuracy}. Perception cells: accuracy (vs the original gold),
  n, unparsed; image_swap adds `follows_donor` (answers the donor image's decision).
  Thinking cells (model's own chain when parseable, else the gold chain, edited and
  teacher-forced; where `source` gives pairs (real data) always the record's own chain, edited
  in place on its concept mentions): accuracy = the answer is the expected one for the edited
  chain (ProbeRow.expected), `unchanged` = same answer as for the unedited chain, `own_chain` =
  share of rows whose own chain was used, `skipped` = rows with no such edit,
  `not_applicable` = rows not scored (`skipped` + rows without a known expected answer, e.g.
  unlabelled ones). `batches_fn()` must give the same eval batches (make_eval_batches format) on
  every call. `scorer`: an AnswerScorer to reuse (e.g. the one given to drift_probe).

  With `blank` (an eval batch of invalid rows) the hosts share the split, as
  answers.predict_split does: `batches_fn(shard_index=, shard_count=)` gives this process's
  share, which it perturbs, decodes and scores itself; the cells, gathered on every process, are
  one process's (image_swap reads the whole split, `batches_fn()`, everywhere).
  """
  kinds = dict(DEFAULT_SEVERITIES if kinds_and_severities is None else kinds_and_severities)
  unknown = [k for k in kinds if k not in PERCEPTION_KINDS + THINKING_KINDS]
  if unknown:
    raise ValueError(
      f'unknown interference kinds {unknown}; known: {PERCEPTION_KINDS + THINKING_KINDS}'
    )
  layout = perturb.PatchLayout.from_processor(processors.image_processor)
  kw = dict(tokenizer=processors.tokenizer, graph=graph, max_new_tokens=max_new_tokens)
  whole = functools.partial(answers.predict_decisions, model, **kw)
  if blank is None:
    own, decode = batches_fn, whole
  else:
    own = functools.partial(batches_fn, **hosts.share(model))
    decode = functools.partial(answers.predict_shared, model, blank=blank, **kw)
  clean = decode(own(), desc='interference: none')
  report = {'none': {'0': answers.decision_accuracy(clean.predicted, clean.gold)}}
  key = jax.random.key(rng_seed)
  for kind in (k for k in kinds if k in PERCEPTION_KINDS):
    report[kind] = {}
    for severity in kinds[kind]:
      # The key depends on (kind, severity) only: a cell does not change with the others asked.
      cell_key = jax.random.fold_in(
        jax.random.fold_in(key, PERCEPTION_KINDS.index(kind)), int(round(1000 * float(severity)))
      )
      donors = []
      swap = kind == 'image_swap'
      batches = _perturbed_batches(
        (batches_fn if swap else own)(), kind, severity, cell_key, layout=layout, donors=donors
      )
      desc = f'interference: {kind} {severity}'
      predicted, gold, *_ = (whole if swap else decode)(batches, desc=desc)
      cell = answers.decision_accuracy(predicted, gold)
      if swap:
        cell['follows_donor'] = mean_or_none(predicted == np.asarray(donors)) if donors else None
      report[kind][str(severity)] = cell
  thinking = {k: v for k, v in kinds.items() if k in THINKING_KINDS}
  if thinking:
    scorer = scorer or AnswerScorer(model, processors, graph)
    batches = own()
    if blank is not None:
      batches = hosts.lockstep(batches, lambda: hosts.probe_blank(blank(), len(graph.concepts)))
    texts = dict(zip(clean.indices.tolist(), clean.texts))
    rows = [
      r
      for batch in batches
      for r in _thinking_rows(scorer, batch, texts, thinking, graph, rng_seed, source)
    ]
    report.update(_thinking_cells(hosts.rows_by_index(rows, gather=blank is not None), thinking))
  return report


def _rows(graph, batch, texts, source):
  """The chains to edit: the records' own (real data), else the model's own chain when usable,
  else the gold one (chain_edits.base_chain). `texts`: the generated text of each valid row by
  record index."""
  if chain_edits.uses_records(source):
    return chain_edits.record_rows(graph, batch, source)
  rows = []
  for concepts, keep, idx in zip(
    batch['concepts'], np.asarray(batch['valid'], bool), batch['index']
  ):
    gold = graph.assignment_from_ids(concepts)
    # Filler rows reuse the gold chain.
    a, s, own = chain_edits.base_chain(graph, texts[int(idx)], gold) if keep else (gold, {}, False)
    rows.append(chain_edits.ProbeRow(graph.chain_text(a, s), a, s, own))
  return rows


def _thinking_rows(scorer, batch, texts, kinds, graph, rng_seed, source=None) -> list[dict]:
  """Per valid row of the batch, per cell 'kind/severity': its answer was the expected one
  (`hit`), the same as for the unedited chain (`unchanged`), its own chain was edited (`own`);
  or `skipped` (no such edit) or `not_applicable` (no expected answer). Every process makes
  the same scorer calls (a cell no row can be scored on anywhere is skipped)."""
  valid = np.asarray(batch['valid'], bool)
  gold = np.asarray(batch['decision'])
  rows = _rows(graph, batch, texts, source)
  # A row without a chain still needs one in the static batch; it is never scored.
  base = [
    r.chain or graph.chain_text(graph.assignment_from_ids(c))
    for r, c in zip(rows, batch['concepts'])
  ]
  embeds = scorer.encode(batch)
  p0 = scorer.distributions(batch, base, embeds)
  out = {i: {'index': int(batch['index'][i])} for i in np.flatnonzero(valid).tolist()}
  cells = [(kind, s) for kind, sevs in kinds.items() for s in sevs]
  edits, scored = {}, {}
  for kind, severity in cells:
    edits[kind, severity] = [
      r.edit(
        graph,
        kind,
        np.random.default_rng([rng_seed, THINKING_KINDS.index(kind), int(severity), int(idx)]),
        num_edits=int(severity),
      )
      if keep
      else None  # filler and blank rows (index -1) are never edited
      for r, idx, keep in zip(rows, batch['index'], valid)
    ]
    scored[kind, severity] = {}
    for i in out:
      e = edits[kind, severity][i]
      expected = None if e is None else rows[i].expected(graph, e, int(gold[i]))
      if expected is not None:
        scored[kind, severity][i] = expected
      else:
        out[i][f'{kind}/{severity}'] = 'skipped' if e is None else 'not_applicable'
  needed = hosts.any_process([bool(scored[cell]) for cell in cells])
  for cell, need in zip(cells, needed):
    if not need:
      continue
    chains = [e.chain if e is not None else b for e, b in zip(edits[cell], base)]
    p1 = scorer.distributions(batch, chains, embeds)
    for i, expected in scored[cell].items():
      answer = int(np.argmax(p1[i]))
      out[i][f'{cell[0]}/{cell[1]}'] = {
        'hit': answer == expected,
        'unchanged': answer == int(np.argmax(p0[i])),
        'own': bool(rows[i].own),
      }
  return list(out.values())


def _thinking_cells(rows: list[dict], kinds) -> dict:
  """{kind: {str(severity): cell}} from every row's results, in record order."""
  out = {}
  for kind, sevs in kinds.items():
    for severity in sevs:
      status = [r[f'{kind}/{severity}'] for r in rows]
      scored = [v for v in status if isinstance(v, dict)]
      out.setdefault(kind, {})[str(severity)] = {
        'accuracy': mean_or_none([v['hit'] for v in scored]),
        'n': len(scored),
        'unchanged': mean_or_none([v['unchanged'] for v in scored]),
        'own_chain': mean_or_none([v['own'] for v in scored]),
        'skipped': status.count('skipped'),
        'not_applicable': len(status) - len(scored),
      }
  return out


def interference_report(
  model,
  batches_fn: Callable[[], Iterable[dict]],
  *,
  processors,
  graph: ConceptGraph,
  kinds_and_severities: Mapping[str, Sequence] | None = None,
  max_new_tokens: int,
  rng_seed: int = 0,
  source=None,
) -> dict:
  """{kind: {str(severity): accuracy}} (report.json's `interference`); see interference_details."""
  details = interference_details(
    model,
    batches_fn,
    processors=processors,
    graph=graph,
    kinds_and_severities=kinds_and_severities,
    max_new_tokens=max_new_tokens,
    rng_seed=rng_seed,
    source=source,
  )
  return accuracies(details)


def not_applicable(details: Mapping) -> dict:
  """{thinking kind: {severity: rows not scored}} (report.json's `interference_not_applicable`)."""
  return {
    kind: {s: cell['not_applicable'] for s, cell in cells.items()}
    for kind, cells in details.items()
    if kind in THINKING_KINDS
  }


def accuracies(details: Mapping) -> dict:
  """{kind: {severity: cell}} -> {kind: {severity: accuracy}}."""
  return {
    kind: {s: cell['accuracy'] for s, cell in cells.items()} for kind, cells in details.items()
  }
