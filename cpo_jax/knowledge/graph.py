"""Concept graphs as data: load, validate, decide, render and parse chains.

A graph file (driving.json, medical.json) lists concepts (each with values, a neutral
value, one canonical sentence per value, near-synonym sentences and free-text `terms`),
decisions (each with its answer text and optional free-text `aliases`; `not_decisions` lists
phrases that hold a decision name without naming it, 'stop sign'), a priority decision
rule, and the relations association / exclusion / irrelevance that the counterfactual
rewriter follows. `term_slots` keeps term lists short: a term '{vehicle} ahead' stands for
one term per word listed under the slot 'vehicle'. Everything else (synthetic renderers, the
rewriter, the drift probe, the tokenizer vocabulary) reads the graph, so a domain is
changed by editing data, not code.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import itertools
import json
import os
import re
from typing import Mapping
from typing import Sequence

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

Assignment = Mapping[str, str]


class GraphError(ValueError):
  """A concept graph file is inconsistent (names the file and the offending entry)."""


@dataclasses.dataclass(frozen=True)
class Concept:
  name: str
  values: tuple[str, ...]
  neutral: str
  phrases: Mapping[str, str]  # value -> canonical sentence
  synonyms: Mapping[str, tuple[str, ...]]  # value -> near-synonym sentences
  # value -> free-text terms
  terms: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

  def sentences(self, value: str) -> tuple[str, ...]:
    return (self.phrases[value],) + tuple(self.synonyms.get(value, ()))


@dataclasses.dataclass(frozen=True)
class ConceptGraph:
  domain: str
  question: str
  answer_template: str
  concepts: tuple[Concept, ...]
  decisions: tuple[str, ...]
  decision_texts: Mapping[str, str]
  clauses: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]  # (decision, any-of conditions)
  default: str
  association: tuple[tuple[str, str, str], ...]
  exclusion: tuple[tuple[str, str, str], ...]
  irrelevance: tuple[tuple[str, str], ...]
  concept_exclusion: tuple[tuple[str, str, str, str], ...]
  nuisance_name: str
  nuisance_values: tuple[str, ...]
  negation_cues: tuple[str, ...] = ()  # free-text negation ('no', 'without', ...) before a term
  # free-text names
  decision_aliases: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  not_decisions: tuple[
    str, ...
  ] = ()  # phrases holding a decision name that name no decision ('stop sign')

  # ---- lookups -------------------------------------------------------------
  @property
  def concept_names(self) -> tuple[str, ...]:
    return tuple(c.name for c in self.concepts)

  def concept(self, name: str) -> Concept:
    for c in self.concepts:
      if c.name == name:
        return c
    raise KeyError(f"{self.domain} graph has no concept {name!r}; known: {self.concept_names}")

  def decision_id(self, decision: str) -> int:
    return self.decisions.index(decision)

  def value_ids(self, assignment: Assignment) -> list[int]:
    """Concept values as integer ids, in concept order (for labels/arrays)."""
    return [c.values.index(assignment[c.name]) for c in self.concepts]

  def assignment_from_ids(self, ids: Sequence[int]) -> dict[str, str]:
    return {c.name: c.values[int(i)] for c, i in zip(self.concepts, ids)}

  # ---- the rule --------------------------------------------------------------
  def is_valid(self, a: Assignment) -> bool:
    """All concepts set to known values and no concept-level exclusion violated."""
    for c in self.concepts:
      if a.get(c.name) not in c.values:
        return False
    return not any(a[c1] == v1 and a[c2] == v2 for c1, v1, c2, v2 in self.concept_exclusion)

  def decide(self, a: Assignment) -> str:
    for decision, conds in self.clauses:
      if any(a[c] == v for c, v in conds):
        return decision
    return self.default

  def all_assignments(self) -> list[dict[str, str]]:
    """Every valid assignment (graphs are small: the product of value counts)."""
    out = []
    for vals in itertools.product(*(c.values for c in self.concepts)):
      a = dict(zip(self.concept_names, vals))
      if self.is_valid(a):
        out.append(a)
    return out

  # ---- text ------------------------------------------------------------------
  def answer_text(self, decision: str) -> str:
    return self.answer_template.format(decision=self.decision_texts[decision])

  def chain_text(self, a: Assignment, sentences: Mapping[str, str] | None = None) -> str:
    """`<think> s1 s2 ... </think>` with one sentence per concept (canonical unless given)."""
    sentences = sentences or {}
    body = " ".join(sentences.get(c.name, c.phrases[a[c.name]]) for c in self.concepts)
    return f"{THINK_OPEN} {body} {THINK_CLOSE}"

  def completion_text(
    self, a: Assignment, decision: str | None = None, sentences: Mapping[str, str] | None = None
  ) -> str:
    decision = self.decide(a) if decision is None else decision
    return f"{self.chain_text(a, sentences)} {self.answer_text(decision)}"

  def parse_chain(self, text: str) -> tuple[dict[str, str], dict[str, str]]:
    """Reads concept values back from a chain (canonical or synonym sentences).

    Returns (assignment, sentence per concept). Concepts not mentioned are absent from
    the assignment; a concept mentioned with two different values raises (a chain that
    contradicts itself is not a usable counterfactual source).
    """
    body = _think_body(text)
    found: dict[str, str] = {}
    used: dict[str, str] = {}
    for sent in _sentences(body):
      hit = self._sentence_index().get(_norm(sent))
      if hit is None:
        continue
      c, v = hit
      if c in found and found[c] != v:
        raise GraphError(f"chain states {c} both as {found[c]!r} and {v!r}: {text!r}")
      found[c] = v
      used[c] = sent
    return found, used

  def decision_spans(self, text: str) -> list[tuple[int, int, str]]:
    """(start, end, decision) of each decision named in `text` by its answer text or an alias
    (whole words; case and punctuation ignored), in text order. A mention inside a longer one of
    another decision ('proceed' in 'proceed with caution') or in a `not_decisions` phrase ('stop
    sign') does not count."""
    low = text.lower()
    spans = [
      (m.start(), m.end(), d)
      for d in self.decisions
      for name in (self.decision_texts[d],) + tuple(self.decision_aliases.get(d, ()))
      for m in phrase_regex(name).finditer(low)
    ]
    spans += [
      (m.start(), m.end(), None) for p in self.not_decisions for m in phrase_regex(p).finditer(low)
    ]
    return sorted(
      s
      for s in spans
      if s[2] is not None
      and not any(
        o[2] != s[2] and o[0] <= s[0] and s[1] <= o[1] and o[1] - o[0] > s[1] - s[0] for o in spans
      )
    )

  def parse_decision(self, text: str) -> str | None:
    """Decision named by the answer part (after </think> if present); None if none/ambiguous."""
    hits = {d for _, _, d in self.decision_spans(text.split(THINK_CLOSE)[-1])}
    return hits.pop() if len(hits) == 1 else None

  def all_sentences(self) -> list[str]:
    return [s for c in self.concepts for v in c.values for s in c.sentences(v)]

  def _sentence_index(self) -> dict[str, tuple[str, str]]:
    idx = getattr(self, "_idx_cache", None)
    if idx is None:
      idx = {_norm(s): (c.name, v) for c in self.concepts for v in c.values for s in c.sentences(v)}
      object.__setattr__(self, "_idx_cache", idx)
    return idx


@functools.lru_cache(maxsize=None)
def phrase_regex(phrase: str) -> re.Pattern:
  """Whole-word match of a phrase in lower-cased text, any non-word run between its words; '...'
  stands for up to 4 words of the same clause ('traffic light ... is red' matches 'the traffic
  light at the intersection is red', not 'the traffic light is green and the car is red')."""
  return re.compile(r"\b" + "".join(sep + word for sep, word in phrase_steps(phrase)) + r"\b")


def phrase_steps(phrase: str) -> list[tuple[str, str]]:
  """The regex of a phrase as [(separator, escaped word)]; the first separator is ''."""
  steps = []
  for part in phrase.split("..."):
    for j, w in enumerate(_norm(part).split()):
      steps.append(("" if not steps else _GAP if j == 0 else r"\W+", re.escape(w)))
  return steps


_SEP = r"[^\w,;.!?]+"  # between two words of one clause
_GAP = rf"{_SEP}(?:(?!(?:and|but|or|while|whereas|so|because|which|that)\b)\w+{_SEP}){{0,4}}?"


def expand_slots(term: str, slots: Mapping[str, Sequence[str]]) -> list[str]:
  """'{cone} in the lane' -> one term per entry of slots['cone'] (every slot in the term, all combinations)."""
  names = re.findall(r"\{(\w+)\}", term)
  unknown = [n for n in names if n not in slots]
  if unknown:
    raise KeyError(f"term {term!r} uses unknown slots {unknown}")
  return [
    term.format(**dict(zip(names, words)))
    for words in itertools.product(*(slots[n] for n in names))
  ]


def _norm(s: str) -> str:
  return " ".join(re.sub(r"[^\w\s]", " ", s.lower()).split())


def _sentences(body: str) -> list[str]:
  return [s.strip() for s in re.findall(r"[^.!?]+[.!?]?", body) if s.strip()]


def _think_body(text: str) -> str:
  m = re.search(re.escape(THINK_OPEN) + r"(.*?)" + re.escape(THINK_CLOSE), text, re.S)
  return m.group(1) if m else text


# ---- loading + validation ------------------------------------------------------


def load_graph(name_or_path: str) -> ConceptGraph:
  """`load_graph('driving')`, `load_graph('medical')` or a path to a JSON graph file; validated."""
  if os.path.exists(name_or_path):
    with open(name_or_path) as f:
      raw, where = json.load(f), name_or_path
  else:
    res = importlib.resources.files("cpo_jax.knowledge").joinpath(f"{name_or_path}.json")
    if not res.is_file():
      raise FileNotFoundError(
        f"no concept graph {name_or_path!r} (not a path, not cpo_jax/knowledge/{name_or_path}.json)"
      )
    raw, where = json.loads(res.read_text()), str(res)
  graph = _from_dict(raw, where)
  validate_graph(graph, where)
  return graph


def _from_dict(raw: dict, where: str) -> ConceptGraph:
  try:
    slots = raw.get("term_slots", {})
    concepts = tuple(
      Concept(
        name=c["name"],
        values=tuple(c["values"]),
        neutral=c["neutral"],
        phrases=dict(c["phrases"]),
        synonyms={k: tuple(v) for k, v in c.get("synonyms", {}).items()},
        terms={
          k: tuple(dict.fromkeys(x for t in v for x in expand_slots(t, slots)))
          for k, v in c.get("terms", {}).items()
        },
      )
      for c in raw["concepts"]
    )
    rel = raw.get("relations", {})
    return ConceptGraph(
      domain=raw["domain"],
      question=raw["question"],
      answer_template=raw["answer_template"],
      concepts=concepts,
      decisions=tuple(d["name"] for d in raw["decisions"]),
      decision_texts={d["name"]: d.get("text", d["name"]) for d in raw["decisions"]},
      clauses=tuple(
        (cl["decision"], tuple(tuple(x) for x in cl["any"])) for cl in raw["rule"]["clauses"]
      ),
      default=raw["rule"]["default"],
      association=tuple(tuple(x) for x in rel.get("association", [])),
      exclusion=tuple(tuple(x) for x in rel.get("exclusion", [])),
      irrelevance=tuple(tuple(x) for x in rel.get("irrelevance", [])),
      concept_exclusion=tuple(tuple(x) for x in raw.get("concept_exclusion", [])),
      nuisance_name=raw["nuisance"]["name"],
      nuisance_values=tuple(raw["nuisance"]["values"]),
      negation_cues=tuple(raw.get("negation_cues", ())),
      decision_aliases={
        d["name"]: tuple(d["aliases"]) for d in raw["decisions"] if d.get("aliases")
      },
      not_decisions=tuple(raw.get("not_decisions", ())),
    )
  except (KeyError, TypeError) as e:
    raise GraphError(f"{where}: malformed graph, missing or wrong field: {e!r}") from e


def validate_graph(g: ConceptGraph, where: str = "<graph>") -> None:
  """Structural checks, then semantic checks of every relation against the rule by enumeration."""
  errs = []
  names = g.concept_names
  if len(set(names)) != len(names):
    errs.append("duplicate concept names")
  for c in g.concepts:
    if c.neutral not in c.values:
      errs.append(f"concept {c.name}: neutral {c.neutral!r} not in values")
    if set(c.phrases) != set(c.values):
      errs.append(f"concept {c.name}: phrases must cover exactly the values {c.values}")
    if not set(c.synonyms) <= set(c.values):
      errs.append(f"concept {c.name}: synonyms for unknown values")
    if not set(c.terms) <= set(c.values):
      errs.append(f"concept {c.name}: terms for unknown values")
    said = {}
    for v, terms in c.terms.items():
      for t in terms:
        if said.setdefault(_norm(t), v) != v:
          errs.append(f"concept {c.name}: term {t!r} given for {said[_norm(t)]!r} and {v!r}")
  known = {(c.name, v) for c in g.concepts for v in c.values}
  dset = set(g.decisions)
  if g.default not in dset:
    errs.append(f"rule default {g.default!r} is not a decision")
  named = {}
  for d in g.decisions:
    for name in (g.decision_texts[d],) + tuple(g.decision_aliases.get(d, ())):
      if named.setdefault(_norm(name), d) != d:
        errs.append(f"decision name {name!r} used for {named[_norm(name)]!r} and {d!r}")
  for d, conds in g.clauses:
    if d not in dset:
      errs.append(f"rule clause decision {d!r} unknown")
    errs += [f"rule condition {cv} unknown" for cv in conds if tuple(cv) not in known]
  for kind, rows in (("association", g.association), ("exclusion", g.exclusion)):
    for c, v, d in rows:
      if (c, v) not in known or d not in dset:
        errs.append(f"{kind} {(c, v, d)} names an unknown concept value or decision")
  for c, v in g.irrelevance:
    if (c, v) not in known:
      errs.append(f"irrelevance {(c, v)} unknown")
  for c1, v1, c2, v2 in g.concept_exclusion:
    if (c1, v1) not in known or (c2, v2) not in known:
      errs.append(f"concept_exclusion {(c1, v1, c2, v2)} unknown")
  # Every sentence must map to one (concept, value), else parsing is ambiguous.
  seen: dict[str, tuple[str, str]] = {}
  for c in g.concepts:
    for v in c.values:
      for s in c.sentences(v):
        k = _norm(s)
        if k in seen and seen[k] != (c.name, v):
          errs.append(f"sentence {s!r} used for {seen[k]} and {(c.name, v)}")
        seen[k] = (c.name, v)
  if errs:
    raise GraphError(f"{where}: " + "; ".join(errs))

  # Semantics, checked on all valid assignments (graphs are small by design).
  all_a = g.all_assignments()
  neutral = {c.name: c.neutral for c in g.concepts}
  if not g.is_valid(neutral):
    errs.append("the all-neutral assignment is invalid")
  for c, v, d in g.association:
    a = dict(neutral, **{c: v})
    if g.is_valid(a) and g.decide(a) != d:
      errs.append(f"association {(c, v, d)}: on the neutral scene it gives {g.decide(a)!r}")
  for c, v, d in g.exclusion:
    bad = [a for a in all_a if a[c] == v and g.decide(a) == d]
    if bad:
      errs.append(f"exclusion {(c, v, d)} violated by {bad[0]}")
  for c, v in g.irrelevance:
    for a in all_a:
      if a[c] == v:
        b = dict(a, **{c: g.concept(c).neutral})
        if g.is_valid(b) and g.decide(b) != g.decide(a):
          errs.append(f"irrelevance {(c, v)} changes the decision at {a}")
          break
  reachable = {g.decide(a) for a in all_a}
  errs += [f"decision {d!r} is unreachable" for d in g.decisions if d not in reachable]
  if errs:
    raise GraphError(f"{where}: " + "; ".join(errs))
