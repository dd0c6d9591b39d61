"""Free-text reports: negation-aware concept matching and the counterfactual rewrite on them.

A report is split into sentences; a sentence mentions concept c with value v when one of
the graph's `terms[v]` occurs as whole words ('pleural effusion'), and a negation cue
('no', 'without', 'free of', ...) earlier in the same clause flips a non-neutral value to the
concept's neutral one ('no pleural effusion' -> effusion = absent). A positive mention wins
over a negated one (radiology convention); unmentioned concepts are neutral.
A term inside a longer term of the same concept does not count ('car ahead' inside 'car ahead
is far away'). The rewrite keeps every sentence that mentions no changed concept (verbatim,
except that a conclusion naming another decision, 'the ego car should slow down', now names the
target), drops those that do, and states the changed (and co-mentioned) concepts with the
graph's canonical sentences, so the output is still a report in the original's words wherever
possible. Decisions named in free text follow the same negation rule ('no need to stop' names
none). `mentions` gives every concept mention with its span in the text, so the thinking probes
can edit a record's own chain in place (evaluate/chain_edits.mention_edit). Known limit: a
NegEx-lite scope (same clause, cue before the term), e.g. 'no change in the effusion' reads as
negated.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np

from cpo_jax.knowledge.graph import THINK_CLOSE
from cpo_jax.knowledge.graph import THINK_OPEN
from cpo_jax.knowledge.graph import ConceptGraph
from cpo_jax.knowledge.graph import GraphError
from cpo_jax.knowledge.graph import phrase_steps
from cpo_jax.knowledge.rewriter import Counterfactual
from cpo_jax.knowledge.rewriter import counterfactual_assignment

# A negation reaches to the end of its clause: 'no cones in the lane and the car ahead is close'.
_CLAUSE_BREAK = re.compile(r"\b(but|however|although|except|and|while|whereas|so|because)\b|[;,]")


_SENTENCE = re.compile(r"[^.!?\n]+[.!?]?")


def _split_sentences(text: str) -> list[str]:
  return [s for s in _SENTENCE.findall(text) if s.strip()]


@functools.lru_cache(maxsize=None)
def _alternation(phrases: tuple[str, ...]) -> re.Pattern:
  """One whole-word regex for a value's terms, as a trie over their words: a slot-expanded list
  of hundreds of terms costs a few alternatives per position, not hundreds. Longer terms first:
  the longest term wins at a position."""
  trie: dict = {}
  for t in sorted(phrases, key=len, reverse=True):
    node = trie
    for step in phrase_steps(t):
      node = node.setdefault(step, {})
    node[("", "")] = {}  # a term ends here (a real step has a word)

  def emit(node) -> str:
    alts = [sep + word + emit(child) for (sep, word), child in node.items()]
    return "" if not alts else alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"

  return re.compile(r"\b" + emit(trie) + r"\b")


def _negated(g: ConceptGraph, low: str, start: int) -> bool:
  """A negation cue earlier in the clause that ends at `start`."""
  if not g.negation_cues:
    return False
  clause_start = max([0] + [b.end() for b in _CLAUSE_BREAK.finditer(low, 0, start)])
  return _alternation(g.negation_cues).search(low, clause_start, start) is not None


def _term_hits(g: ConceptGraph, low: str) -> list[tuple[str, str, int, int]]:
  """(concept, value, start, end) of every term in a lower-cased sentence, negation applied; a
  hit inside a longer hit of the same concept is dropped ('car ahead' in 'car ahead is far away')."""
  return [(c, v, s, e) for c, v, _, s, e in _hits(g, low)]


def _hits(g: ConceptGraph, low: str) -> list[tuple[str, str, str, int, int]]:
  """_term_hits with the value whose term matched: (concept, stated, term value, start, end)."""
  out = []
  for c in g.concepts:
    hits = []
    for v, terms in c.terms.items():
      for m in _alternation(terms).finditer(low):
        negated = _negated(g, low, m.start())
        if negated and v == c.neutral:
          continue  # 'not normal' says nothing usable
        hits.append((c.name, c.neutral if negated else v, v, m.start(), m.end()))
    out += [
      h
      for h in hits
      if not any(o[3] <= h[3] and h[4] <= o[4] and o[4] - o[3] > h[4] - h[3] for o in hits)
    ]
  return out


def sentence_mentions(g: ConceptGraph, sentence: str) -> dict[str, str]:
  """concept -> value stated by one sentence (negation aware)."""
  found: dict[str, list[str]] = {}
  for c, v, _, _ in _term_hits(g, sentence.lower()):
    found.setdefault(c, []).append(v)
  out = {}
  for c, vals in found.items():
    positive = [v for v in vals if v != g.concept(c).neutral]
    out[c] = positive[0] if positive else g.concept(c).neutral
  return out


def stated_decisions(
  g: ConceptGraph, sentence: str, *, evidence_too: bool = False
) -> list[tuple[int, int, str]]:
  """(start, end, decision) a sentence concludes ('the ego car should slow down'): decision names
  not negated ('no need to stop') and, unless evidence_too, not part of a concept term (medical
  'pleural effusion' in a report is evidence, not a conclusion)."""
  low = sentence.lower()
  terms = [] if evidence_too else [(s, e) for _, _, s, e in _term_hits(g, low)]
  return [
    d
    for d in g.decision_spans(sentence)
    if not _negated(g, low, d[0]) and not any(s <= d[0] and d[1] <= e for s, e in terms)
  ]


def answer_decision(g: ConceptGraph, text: str) -> str | None:
  """The one decision a free-text answer names (negation aware), else None."""
  said = {
    d for s in _split_sentences(text) for _, _, d in stated_decisions(g, s, evidence_too=True)
  }
  return said.pop() if len(said) == 1 else None


def parse_report(
  g: ConceptGraph, text: str
) -> tuple[dict[str, str], list[tuple[str, dict[str, str]]]]:
  """(assignment with neutral defaults, [(sentence, its mentions)])."""
  body = text.split(THINK_OPEN)[-1].split(THINK_CLOSE)[0] if THINK_OPEN in text else text
  sents = [(s, sentence_mentions(g, s)) for s in _split_sentences(body)]
  a = {c.name: c.neutral for c in g.concepts}
  for _, m in sents:
    for c, v in m.items():
      if a[c] == g.concept(c).neutral:  # the first positive mention wins
        a[c] = v
  return a, sents


@dataclasses.dataclass(frozen=True)
class Mention:
  """`text[start:end]` states `value` of `concept`; `term_value` is the value whose term matched
  (another one when a negation cue flips it: 'no pneumothorax' states absent with a present term)."""

  concept: str
  value: str
  term_value: str
  start: int
  end: int

  @property
  def negated(self) -> bool:
    return self.value != self.term_value


def report_span(text: str) -> tuple[int, int]:
  """[start, end) of the part parse_report reads: after the last <think> up to the next
  </think> (or the end), else the whole text."""
  if THINK_OPEN not in text:
    return 0, len(text)
  start = text.rfind(THINK_OPEN) + len(THINK_OPEN)
  end = text.find(THINK_CLOSE, start)
  return start, len(text) if end < 0 else end


def mentions(g: ConceptGraph, text: str) -> list[Mention]:
  """Every concept mention parse_report reads in `text`, with its span in `text`, in text order.
  A sentence whose lower-casing changes its length (rare Unicode) gives none: its spans would
  not point into the text."""
  lo, hi = report_span(text)
  out = []
  for m in _SENTENCE.finditer(text[lo:hi]):  # the sentences of _split_sentences
    low = m.group().lower()
    if not low.strip() or len(low) != len(m.group()):
      continue
    off = lo + m.start()
    out += [Mention(c, v, tv, off + s, off + e) for c, v, tv, s, e in _hits(g, low)]
  return sorted(out, key=lambda x: (x.start, x.end, x.concept))


def term_text(term: str) -> str:
  """A graph term as text to write ('traffic light ... is red' -> 'traffic light is red')."""
  return " ".join(term.replace("...", " ").split())


def replace_spans(text: str, edits) -> str:
  """`text` with each (start, end, new) span replaced (spans must not overlap); the rest verbatim.
  A replacement takes the capital of the text it replaces ('Cardiomegaly' -> 'Enlarged heart')."""
  for start, end, new in sorted(edits, reverse=True):
    if text[start:end][:1].isupper():
      new = new[:1].upper() + new[1:]
    text = text[:start] + new + text[end:]
  return text


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
        kept.append(_conclude(g, s.strip(), t))
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


def _conclude(g: ConceptGraph, sentence: str, target: str) -> str:
  """A kept sentence that concludes another decision ('Slow down and keep a safe distance') now
  concludes the target ('Stop and keep a safe distance'), so the report does not contradict its answer."""
  name = g.decision_texts[target]
  for start, end, d in reversed(stated_decisions(g, sentence)):
    if d != target:
      said = sentence[start:end]
      sentence = (
        sentence[:start]
        + (name[:1].upper() + name[1:] if said[:1].isupper() else name)
        + sentence[end:]
      )
  return sentence


def validate_report(
  g: ConceptGraph, completion: str, *, original_decision: str, target: str
) -> tuple[bool, str]:
  """Does a free-text completion support `target` (rule on its parsed report), name it, and
  conclude nothing else in the report?"""
  if target == original_decision:
    return False, "target equals the original decision"
  a, sents = parse_report(g, completion)
  said = {d for s, _ in sents for _, _, d in stated_decisions(g, s)} - {target}
  if said:
    return False, f"report concludes {sorted(said)}, not only {target!r}"
  if not g.is_valid(a):
    return False, f"report states an impossible combination {a}"
  if g.decide(a) != target:
    return False, f"report supports {g.decide(a)!r}, not {target!r}"
  if g.parse_decision(completion) != target:
    return False, f"answer names {g.parse_decision(completion)!r}, not {target!r}"
  return True, "ok"
