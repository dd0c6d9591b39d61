"""Free-text reports: negation-aware concept matching and the counterfactual rewrite on them.

A report is split into sentences; a sentence mentions concept c with value v when one of
the graph's `terms[v]` occurs as whole words ('pleural effusion'), and a negation cue
('no', 'without', 'free of', ...) earlier in the same clause flips a non-neutral value to the
concept's neutral one ('no pleural effusion' -> effusion = absent). A positive mention wins
over a negated one (radiology convention); unmentioned concepts are neutral.
The rewrite keeps every sentence that mentions no changed concept verbatim, drops those that
do, and states the changed (and co-mentioned) concepts with the graph's canonical sentences,
so the output is still a report in the original's words wherever possible. Known limit: a
NegEx-lite scope (same clause, cue before the term), e.g. 'no change in the effusion' reads
as negated.
"""
from __future__ import annotations

import re

import numpy as np

from cpo_jax.knowledge.graph import THINK_CLOSE, THINK_OPEN, ConceptGraph, GraphError
from cpo_jax.knowledge.rewriter import Counterfactual, counterfactual_assignment

_CLAUSE_BREAK = re.compile(r"\b(but|however|although|except)\b|[;,]")


def _split_sentences(text: str) -> list[str]:
  return [s for s in re.findall(r"[^.!?\n]+[.!?]?", text) if s.strip()]


def _term_regex(term: str) -> re.Pattern:
  return re.compile(r"\b" + r"\s+".join(map(re.escape, term.lower().split())) + r"\b")


def sentence_mentions(g: ConceptGraph, sentence: str) -> dict[str, str]:
  """concept -> value stated by one sentence (negation aware)."""
  low = sentence.lower()
  out: dict[str, str] = {}
  for c in g.concepts:
    found = []
    for v, terms in c.terms.items():
      for t in sorted(terms, key=len, reverse=True):
        for m in _term_regex(t).finditer(low):
          clause_start = max([0] + [b.end() for b in _CLAUSE_BREAK.finditer(low, 0, m.start())])
          before = low[clause_start:m.start()]
          negated = any(_term_regex(cue).search(before) for cue in g.negation_cues)
          if negated and v == c.neutral:
            continue  # 'not normal' says nothing usable
          found.append(c.neutral if negated else v)
    if found:
      positive = [v for v in found if v != c.neutral]
      out[c.name] = positive[0] if positive else c.neutral
  return out


def parse_report(g: ConceptGraph, text: str) -> tuple[dict[str, str], list[tuple[str, dict[str, str]]]]:
  """(assignment with neutral defaults, [(sentence, its mentions)])."""
  body = text.split(THINK_OPEN)[-1].split(THINK_CLOSE)[0] if THINK_OPEN in text else text
  sents = [(s, sentence_mentions(g, s)) for s in _split_sentences(body)]
  a = {c.name: c.neutral for c in g.concepts}
  for _, m in sents:
    for c, v in m.items():
      if a[c] == g.concept(c).neutral:  # the first positive mention wins
        a[c] = v
  return a, sents


def rewrite_report(g: ConceptGraph, text: str, *, k: int = 1, seed=0) -> list[Counterfactual]:
  """k counterfactual reports for other decisions; `completion` is '<think> report </think> answer'."""
  rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
  a, sents = parse_report(g, text)
  orig = g.decide(a)
  others = [d for d in g.decisions if d != orig]
  out = []
  for t in [others[i] for i in rng.permutation(len(others))[:k]]:
    b, fb = counterfactual_assignment(g, a, t, rng)
    changed = {c for c in g.concept_names if b[c] != a[c]}
    kept, restate, still_said = [], set(changed), set()
    for s, m in sents:
      if changed & set(m):
        restate |= set(m)  # the dropped sentence also spoke about these: say them again
      else:
        kept.append(s.strip())
        still_said |= set(m)
    restate = changed | (restate - still_said)
    added = [g.concept(c).phrases[b[c]] for c in g.concept_names if c in restate]
    report = " ".join(kept + added)
    completion = f"{THINK_OPEN} {report} {THINK_CLOSE} {g.answer_text(t)}"
    ok, why = validate_report(g, completion, original_decision=orig, target=t)
    if not ok:
      raise GraphError(f"free-text rewrite failed ({why}): {completion!r}")
    out.append(Counterfactual(b, t, completion, tuple(sorted(changed)), fb))
  return out


def validate_report(g: ConceptGraph, completion: str, *, original_decision: str, target: str) -> tuple[bool, str]:
  """Does a free-text completion support `target` (rule on its parsed report) and name it?"""
  if target == original_decision:
    return False, "target equals the original decision"
  a, _ = parse_report(g, completion)
  if not g.is_valid(a):
    return False, f"report states an impossible combination {a}"
  if g.decide(a) != target:
    return False, f"report supports {g.decide(a)!r}, not {target!r}"
  if g.parse_decision(completion) != target:
    return False, f"answer names {g.parse_decision(completion)!r}, not {target!r}"
  return True, "ok"
