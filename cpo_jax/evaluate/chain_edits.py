"""Chain edits that the concept graph can judge.

synonym     the same value said another way: the answer should not move;
contradict  other valid values for which the graph's rule gives another decision: the answer
            should follow the chain.

Graph-canonical chains (synthetic data, a model's own canonical chain) get whole concept
sentences replaced (`synonym_edit`, `contradict_edit`). A record's own free-text chain (real
data) is edited in place (`mention_edit`): one concept mention, found with the graph's
free-text terms, gets another term, and every other character of the chain is kept.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Mapping
from typing import Sequence

import numpy as np

from cpo_jax.data import eval_batches
from cpo_jax.data import examples
from cpo_jax.knowledge import free_text
from cpo_jax.knowledge.graph import THINK_CLOSE
from cpo_jax.knowledge.graph import THINK_OPEN
from cpo_jax.knowledge.graph import ConceptGraph
from cpo_jax.knowledge.graph import GraphError
from cpo_jax.knowledge.graph import _norm as _norm_sentence  # the graph's own sentence matching.


@dataclasses.dataclass(frozen=True)
class ChainEdit:
  chain: str  # '<think> ... </think>' with the edited sentence(s)
  assignment: dict  # the concept values the edited chain states
  concepts: tuple[str, ...]  # the edited concepts
  kind: str  # 'synonym' | 'contradict'
  expected_decision: str  # the graph's decision for the edited chain
  # mention_edit: (start, end) in the original chain and the text written there
  replaced: tuple[tuple[int, int, str], ...] = ()


def synonym_edit(
  graph: ConceptGraph,
  assignment: Mapping[str, str],
  rng: np.random.Generator,
  *,
  num_edits: int = 1,
  sentences: Mapping[str, str] | None = None,
  among: Sequence[str] | None = None,
) -> ChainEdit | None:
  """Rewords `num_edits` concept sentences with another sentence for the same value.

  `sentences` is the current wording per concept (e.g. from parse_chain; canonical if absent);
  `among` restricts which concepts may be edited. None when too few concepts have another
  wording.
  """
  sentences = dict(sentences or {})
  options = {}
  for c in graph.concepts:
    if among is not None and c.name not in among:
      continue
    current = _norm_sentence(sentences.get(c.name, c.phrases[assignment[c.name]]))
    alternatives = [s for s in c.sentences(assignment[c.name]) if _norm_sentence(s) != current]
    if alternatives:
      options[c.name] = alternatives
  if len(options) < num_edits:
    return None
  names = list(options)
  chosen = tuple(names[i] for i in sorted(rng.choice(len(names), num_edits, replace=False)))
  for c in chosen:
    sentences[c] = options[c][int(rng.integers(len(options[c])))]
  return ChainEdit(
    graph.chain_text(assignment, sentences),
    dict(assignment),
    chosen,
    'synonym',
    graph.decide(assignment),
  )


def contradict_edit(
  graph: ConceptGraph,
  assignment: Mapping[str, str],
  rng: np.random.Generator,
  *,
  num_edits: int = 1,
  sentences: Mapping[str, str] | None = None,
  among: Sequence[str] | None = None,
) -> ChainEdit | None:
  """States other values for exactly `num_edits` concepts such that the decision changes.

  Chosen uniformly among all valid such edits (graphs are small: enumeration is exact).
  Edited concepts get their canonical sentence, the others keep `sentences`. None when no
  such edit exists (e.g. red light AND a crossing pedestrian: one edit still gives stop).
  """
  names = [c for c in graph.concept_names if among is None or c in among]
  before = graph.decide(assignment)
  candidates = []
  for combo in itertools.combinations(names, num_edits):
    others = [[v for v in graph.concept(c).values if v != assignment[c]] for c in combo]
    for values in itertools.product(*others):
      b = dict(assignment, **dict(zip(combo, values)))
      if graph.is_valid(b) and graph.decide(b) != before:
        candidates.append((combo, b))
  if not candidates:
    return None
  combo, b = candidates[int(rng.integers(len(candidates)))]
  kept = {c: s for c, s in (sentences or {}).items() if c not in combo}
  return ChainEdit(graph.chain_text(b, kept), b, combo, 'contradict', graph.decide(b))


EDITS = {'synonym': synonym_edit, 'contradict': contradict_edit}


def base_chain(graph: ConceptGraph, text: str, gold: Mapping[str, str]) -> tuple[dict, dict, bool]:
  """(assignment, sentences, own): the model's own chain when it is closed and states every
  concept consistently, else the gold assignment in canonical wording (own=False)."""
  try:
    found, used = graph.parse_chain(text) if THINK_CLOSE in text else ({}, {})
  except GraphError:  # a chain that contradicts itself
    found, used = {}, {}
  if set(found) == set(graph.concept_names) and graph.is_valid(found):
    return dict(found), dict(used), True
  return dict(gold), {}, False


@dataclasses.dataclass(frozen=True)
class ProbeRow:
  """One eval row as the thinking probes see it: the chain they teacher-force and edit."""

  chain: str | None  # None: the record has no chain (the probes do not apply)
  assignment: dict  # the concept values the graph reads in the chain
  sentences: dict  # graph-canonical rows: the current sentence per concept (parse_chain)
  own: bool = False  # the model's own chain (thinking interference)
  free: bool = False  # a record's own free-text chain: edited in place (mention_edit)

  def edit(self, graph: ConceptGraph, kind: str, rng, **kw) -> ChainEdit | None:
    if self.chain is None:
      return None
    if self.free:
      return mention_edit(graph, self.chain, kind, rng, **kw)
    return EDITS[kind](graph, self.assignment, rng, sentences=self.sentences, **kw)

  def expected(self, graph: ConceptGraph, edit: ChainEdit, gold: int) -> int | None:
    """The decision id that an answer reasoning from the edited chain gives; None where it is
    not known (the row is then not scored). Unlabelled rows (gold -1): None. Graph chains: the
    graph's decision for the edited chain. A record's own chain: a synonym keeps the record's
    label; a contradiction gives the graph's decision for the edited chain, known only where
    the graph reads the label from the unedited chain (else the rule does not explain it)."""
    if gold < 0:
      return None
    if self.free and edit.kind == 'synonym':
      return gold
    if self.free and graph.decision_id(graph.decide(self.assignment)) != gold:
      return None
    return graph.decision_id(edit.expected_decision)


def uses_records(source) -> bool:
  """Do the probes read the records' own chains? Yes for sources that give pairs (real data)."""
  return source is not None and examples.gives_pairs(source)


def record_rows(graph: ConceptGraph, batch, source) -> list[ProbeRow]:
  """Per eval row, the record's own chain (the chosen text's '<think> ... </think>', verbatim)
  and what the graph reads in it; filler rows (valid False) get none."""
  rows = []
  for idx, keep in zip(batch['index'], batch['valid']):
    text = eval_batches.gold_completion(source, source[int(idx)]) if keep else ''
    chain = record_chain(text)
    a = free_text.parse_report(graph, chain)[0] if chain else {}
    rows.append(ProbeRow(chain, a, {}, free=True))
  return rows


def record_chain(text: str) -> str | None:
  """A record's own chain: the '<think> ... </think>' part of its text, verbatim (the part
  parse_report reads); None when the text has no closed chain."""
  start, end = free_text.report_span(text)
  if THINK_OPEN not in text or not text.startswith(THINK_CLOSE, end):
    return None
  return text[start - len(THINK_OPEN) : end + len(THINK_CLOSE)]


def mention_edit(
  graph: ConceptGraph,
  chain: str,
  kind: str,
  rng: np.random.Generator,
  *,
  num_edits: int = 1,
  among: Sequence[str] | None = None,
) -> ChainEdit | None:
  """Edits a free-text chain in place: one mention each of `num_edits` concepts gets another
  graph term; every other character is kept.

  synonym: a term of the value the mention's term has (so a negation cue before it still
  applies: 'no pneumothorax' -> 'no pleural line'). contradict: terms of other values for which
  the graph's decision on the chain (free_text.parse_report) changes, chosen uniformly among
  such (concepts, values) like contradict_edit; a negated mention is never contradicted (its
  cue would turn any term back to the neutral value). Each new term must be read as the
  intended value where it was written and the whole chain as the intended assignment (a
  concept stated twice cannot be changed by one mention). `among` restricts the concepts.
  None when no such edit exists.
  """
  a, _ = free_text.parse_report(graph, chain)
  found = [m for m in free_text.mentions(graph, chain) if among is None or m.concept in among]
  if kind == 'contradict':
    found = [m for m in found if not m.negated]
  names = list(dict.fromkeys(m.concept for m in found))
  before = graph.decide(a)
  plans = []
  for combo in itertools.combinations(names, num_edits):
    if kind == 'synonym':
      plans.append((combo, dict(a)))
      continue
    others = [[v for v in graph.concept(c).values if v != a[c]] for c in combo]
    for values in itertools.product(*others):
      b = dict(a, **dict(zip(combo, values)))
      if graph.is_valid(b) and graph.decide(b) != before:
        plans.append((combo, b))
  for p in rng.permutation(len(plans)):
    combo, b = plans[p]
    edits = _realise(graph, chain, found, combo, b, kind, rng)
    if edits is not None:
      return ChainEdit(
        free_text.replace_spans(chain, edits), b, combo, kind, graph.decide(b), tuple(edits)
      )
  return None


def _realise(graph, chain, found, combo, target, kind, rng):
  """(start, end, term) per concept of `combo` such that the edited chain states `target`, the
  first that works in rng order (mentions, then terms); None if a concept has none."""
  edits = []
  for c in combo:
    done = False
    mentions = [m for m in found if m.concept == c]
    for mi in rng.permutation(len(mentions)):
      m = mentions[mi]
      if any(s < m.end and m.start < e for s, e, _ in edits):
        continue  # one span cannot carry two edits
      said = _norm_sentence(chain[m.start : m.end])
      value = m.term_value if kind == 'synonym' else target[c]
      terms = [
        t
        for t in map(free_text.term_text, graph.concept(c).terms.get(value, ()))
        if _norm_sentence(t) != said
      ]
      for ti in rng.permutation(len(terms)):
        trial = edits + [(m.start, m.end, terms[ti])]
        if _reads(graph, chain, trial, c, m.value if kind == 'synonym' else target[c]):
          edits, done = trial, True
          break
      if done:
        break
    if not done:
      return None
  text = free_text.replace_spans(chain, edits)
  return edits if free_text.parse_report(graph, text)[0] == target else None


def _reads(graph, chain, edits, concept, value) -> bool:
  """Is the last edit's new text read as `concept` = `value` and nothing else? (A term the graph
  also lists for other concepts, 'no acute cardiopulmonary process', would state them too.)"""
  start, end, new = edits[-1]
  shift = sum(len(n) - (e - s) for s, e, n in edits if s < start)
  lo, hi = start + shift, start + shift + len(new)
  said = {
    (m.concept, m.value)
    for m in free_text.mentions(graph, free_text.replace_spans(chain, edits))
    if m.start < hi and lo < m.end
  }
  return said == {(concept, value)}
