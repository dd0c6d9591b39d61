"""Concept graphs load and validate; the rewriter's counterfactuals pass the validator."""

import dataclasses
import itertools

import pytest

from cpo_jax.knowledge import GraphError
from cpo_jax.knowledge import load_graph
from cpo_jax.knowledge import rewrite
from cpo_jax.knowledge import rewrite_chain
from cpo_jax.knowledge import validate_counterfactual
from cpo_jax.knowledge.graph import validate_graph


@pytest.fixture(scope="module")
def drive():
  return load_graph("driving")


@pytest.mark.parametrize("name", ["driving", "medical"])
def test_graphs_load_and_every_decision_reachable(name):
  g = load_graph(name)
  assert {g.decide(a) for a in g.all_assignments()} == set(g.decisions)


def test_driving_rule(drive):
  base = dict(traffic_light="none", pedestrian="none", lead_vehicle="none", cone="none")
  assert drive.decide(base) == "proceed"
  assert drive.decide(dict(base, lead_vehicle="near")) == "slow_down"
  assert drive.decide(dict(base, lead_vehicle="far")) == "proceed"
  assert drive.decide(dict(base, cone="in_lane", lead_vehicle="near")) == "change_lane"
  assert drive.decide(dict(base, cone="in_lane", traffic_light="red")) == "stop"
  assert drive.decide(dict(base, pedestrian="crossing", traffic_light="green")) == "stop"


def test_validation_rejects_inconsistent_relations(drive):
  bad = dataclasses.replace(
    drive, association=drive.association + (("lead_vehicle", "far", "stop"),)
  )
  with pytest.raises(GraphError, match="association"):
    validate_graph(bad)
  bad = dataclasses.replace(drive, exclusion=drive.exclusion + (("lead_vehicle", "near", "stop"),))
  with pytest.raises(GraphError, match="exclusion"):
    validate_graph(bad)
  bad = dataclasses.replace(drive, irrelevance=(("lead_vehicle", "near"),))
  with pytest.raises(GraphError, match="irrelevance"):
    validate_graph(bad)


@pytest.mark.parametrize("name", ["driving", "medical"])
def test_rewriter_all_assignments_all_targets_valid(name):
  g = load_graph(name)
  n = 0
  for a, seed in itertools.product(g.all_assignments(), range(3)):
    orig = g.decide(a)
    cfs = rewrite(g, a, k=len(g.decisions) - 1, seed=seed)
    assert {c.decision for c in cfs} == set(g.decisions) - {orig}
    for cf in cfs:
      ok, why = validate_counterfactual(
        g, cf.completion, original_decision=orig, target=cf.decision
      )
      assert ok, why
      assert cf.changed and not cf.used_fallback  # relations alone suffice for the shipped graphs
      n += 1
  assert n >= 36 * 3 * 3


def test_rewriter_deterministic_and_seed_dependent(drive):
  a = dict(traffic_light="red", pedestrian="crossing", lead_vehicle="near", cone="none")
  runs = [[c.completion for c in rewrite(drive, a, k=2, seed=s)] for s in (7, 7, 8, 9, 10)]
  assert runs[0] == runs[1]
  assert len({tuple(r) for r in runs[1:]}) > 1


def test_rewrite_chain_keeps_synonym_wording(drive):
  text = (
    "<think> The signal is green. Nobody is on the crosswalk. The car ahead is close. "
    "The lane has no cones. </think> The decision is slow down."
  )
  assert drive.parse_decision(text) == "slow_down"
  for cf in rewrite_chain(drive, text, k=3, seed=0):
    assert validate_counterfactual(
      drive, cf.completion, original_decision="slow_down", target=cf.decision
    )[0]
    for c in set(drive.concept_names) - set(cf.changed):
      assert (
        drive.parse_chain(text)[1][c] in cf.completion
      )  # unchanged concepts keep their sentence


def test_validator_rejects_invalid_counterfactuals(drive):
  good = "<think> The traffic light is red. No pedestrian is crossing. The lead vehicle is far. The lane is clear of cones. </think> The decision is stop."
  assert validate_counterfactual(drive, good, original_decision="proceed", target="stop")[0]
  cases = {
    "same as original": (good, "stop", "stop"),
    "chain supports other": (good.replace("red", "green"), "slow_down", "stop"),
    "answer mismatch": (good.replace("is stop", "is proceed"), "proceed", "stop"),
    "missing concept": (good.replace(" The lead vehicle is far.", ""), "proceed", "stop"),
    "contradiction": (
      good.replace(
        "The lead vehicle is far.", "The lead vehicle is far. The lead vehicle is near."
      ),
      "proceed",
      "stop",
    ),
    "no answer": (good.split("</think>")[0] + "</think>", "proceed", "stop"),
  }
  for name, (text, orig, target) in cases.items():
    ok, why = validate_counterfactual(drive, text, original_decision=orig, target=target)
    assert not ok, name


def test_parse_decision(drive):
  assert drive.parse_decision("<think> x </think> The decision is change lane.") == "change_lane"
  assert drive.parse_decision("The decision is slow down.") == "slow_down"
  assert drive.parse_decision("The decision is stop or proceed.") is None
  assert drive.parse_decision("I do not know.") is None


def test_drift_edits(drive):
  from cpo_jax.knowledge import drift

  assert drift.answer_prefix(drive) == "The decision is"
  for i, a in enumerate(drive.all_assignments()):
    syn = drift.edit_chain(drive, a, "synonym", seed=i)
    parsed, sents = drive.parse_chain(syn.chain)
    assert parsed == a and syn.expected_decision == drive.decide(a)
    assert sents[syn.concept] != drive.concept(syn.concept).phrases[a[syn.concept]]
    con = drift.edit_chain(drive, a, "contradict", seed=i)
    parsed, _ = drive.parse_chain(con.chain)
    assert [c for c in drive.concept_names if parsed[c] != a[c]] == [con.concept]
    assert con.expected_decision == drive.decide(parsed)


def _fixture_report(g, a, rng):
  """A free-text report stating assignment `a` in varied words, negations and fillers."""
  fill = [
    "Comparison is made to the prior study.",
    "Support devices are unchanged.",
    "Osseous structures are intact.",
  ]
  pos = ["{T}.", "Findings of {t}.", "There is {t} on the right."]
  neg = ["No {t}.", "There is no {t}.", "Negative for {t}.", "The study is free of {t}."]
  out, negs = [], []
  for c in g.concepts:
    v = a[c.name]
    nonneutral = [x for x in c.values if x != c.neutral]
    if v != c.neutral:
      t = str(rng.choice(c.terms[v]))
      out.append(str(rng.choice(pos)).format(t=t, T=t[0].upper() + t[1:]))
    elif rng.random() < 0.6 and c.terms.get(nonneutral[0]):
      negs.append(str(rng.choice(c.terms[nonneutral[0]])))
  if len(negs) >= 2 and rng.random() < 0.5:  # 'No X or Y.' negates both
    out.append(f"No {negs[0]} or {negs[1]}.")
    negs = negs[2:]
  out += [str(rng.choice(neg)).format(t=t) for t in negs]
  out.append(str(rng.choice(fill)))
  return " ".join(str(s) for s in rng.permutation(out))


def test_free_text_parse_and_rewrite_200_reports():
  import numpy as np

  from cpo_jax.knowledge import free_text

  g = load_graph("medical")
  rng = np.random.default_rng(0)
  assigns = g.all_assignments()
  n = 0
  for i in range(200):
    a = assigns[int(rng.integers(len(assigns)))]
    text = _fixture_report(g, a, rng)
    parsed, _ = free_text.parse_report(g, text)
    assert parsed == a, text
    for cf in free_text.rewrite_report(g, text, k=2, seed=i):
      ok, why = free_text.validate_report(
        g, cf.completion, original_decision=g.decide(a), target=cf.decision
      )
      assert ok, why
      n += 1
  assert n == 400


def test_free_text_negation_and_invalid_reports():
  from cpo_jax.knowledge import free_text

  g = load_graph("medical")
  m = free_text.sentence_mentions
  assert m(g, "No pleural effusion.") == {"effusion": "absent"}
  assert m(g, "Small pleural effusion is present.") == {"effusion": "present"}
  assert m(g, "No effusion or pneumothorax, but there is a right lower lobe opacity.") == {
    "effusion": "absent",
    "pneumothorax_line": "absent",
    "consolidation": "present",
  }
  assert m(g, "The heart is enlarged.") == {"heart_size": "enlarged"}
  bad = {
    "supports original": (
      "<think> Small pleural effusion. </think> The disease of this patient is pneumonia.",
      "pleural_effusion",
      "pneumonia",
    ),
    "answer mismatch": (
      "<think> Right lower lobe opacity. </think> The disease of this patient is cardiomegaly.",
      "no_finding",
      "pneumonia",
    ),
    "negated evidence": (
      "<think> No consolidation. </think> The disease of this patient is pneumonia.",
      "no_finding",
      "pneumonia",
    ),
  }
  for name, (text, orig, target) in bad.items():
    assert not free_text.validate_report(g, text, original_decision=orig, target=target)[0], name


@pytest.mark.parametrize("name", ["driving", "medical"])
def test_every_graph_sentence_parses_as_free_text(name):
  """The rewriter writes the graph's sentences into free-text reports: its terms must read them back."""
  from cpo_jax.knowledge import free_text

  g = load_graph(name)
  for c in g.concepts:
    for v in c.values:
      for s in c.sentences(v):
        m = free_text.sentence_mentions(g, s)
        assert m == {c.name: v} or (v == c.neutral and m == {}), (s, m)


def test_free_text_slots_gaps_aliases_and_containment(drive):
  from cpo_jax.knowledge import free_text
  from cpo_jax.knowledge.graph import expand_slots

  assert expand_slots("{cone} in the {lane}", {"cone": ["cone", "cones"], "lane": ["lane"]}) == [
    "cone in the lane",
    "cones in the lane",
  ]
  m = free_text.sentence_mentions
  assert m(drive, "The traffic light at the busy intersection is red.") == {
    "traffic_light": "red"
  }  # '...' gap
  assert m(drive, "The traffic light is green and the truck is red.") == {
    "traffic_light": "green"
  }  # not across 'and'
  assert m(drive, "A truck ahead in the distance.") == {
    "lead_vehicle": "far"
  }  # 'truck ahead' is inside it
  assert m(drive, "A truck ahead in the adjacent lane.") == {"lead_vehicle": "none"}
  assert m(drive, "There are no cones in the lane and a bus is directly ahead.") == {
    "cone": "none",
    "lead_vehicle": "near",
  }  # the negation ends with its clause
  assert (
    drive.parse_decision("The ego car should proceed with caution.") == "slow_down"
  )  # not also 'proceed'
  assert (
    drive.parse_decision("Wait at the stop line, then change lanes.") == "change_lane"
  )  # 'stop line' names none
  assert (
    free_text.answer_decision(drive, "There is no need to stop. Slow down for the truck ahead.")
    == "slow_down"
  )
  assert free_text.answer_decision(drive, "Slow down, or stop if the truck ahead brakes.") is None


def test_graph_rejects_ambiguous_terms_and_decision_names(drive):
  c = drive.concepts[0]
  bad = dataclasses.replace(
    drive,
    concepts=(dataclasses.replace(c, terms={**c.terms, "green": ("red light",)}),)
    + drive.concepts[1:],
  )
  with pytest.raises(GraphError, match="term 'red light' given for 'red' and 'green'"):
    validate_graph(bad)
  bad = dataclasses.replace(
    drive, decision_aliases={**drive.decision_aliases, "proceed": ("halt",)}
  )
  with pytest.raises(GraphError, match="decision name 'halt' used for 'stop' and 'proceed'"):
    validate_graph(bad)
