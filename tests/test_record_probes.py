"""Thinking probes on real data: a record's own free-text chain, edited in place on its concept
mentions (chain_edits.mention_edit), and rows a probe cannot apply to counted, not scored."""

import json

from flax import nnx
import numpy as np
import pytest

from cpo_jax import models
from cpo_jax.data import eval_batches
from cpo_jax.data import sources
from cpo_jax.data import synth_cxr
from cpo_jax.evaluate import chain_edits
from cpo_jax.evaluate import drift_probe
from cpo_jax.evaluate import interference
from cpo_jax.knowledge import free_text
from cpo_jax.knowledge import load_graph

# Not graph-canonical: synonyms ('cardiomegaly', 'effusions'), extra words, a negation, a clause.
CXR = (
  '<think> Mild cardiomegaly, with small bilateral pleural effusions. No pneumothorax. '
  'Stable sternotomy wires. </think> The disease of this patient is pleural effusion.'
)
ROAD = (
  '<think> The traffic light at the intersection is green, and a truck ahead in the same lane '
  'is braking. No cones are visible. </think> The decision is slow down.'
)
NO_MENTION = '<think> Support devices are unchanged in position. </think> The disease of this patient is no finding.'
UNLABELLED = (
  '<think> Small left effusion and a retrocardiac opacity. </think> Effusion and opacity.'
)
NO_CHAIN = 'Cardiomegaly.'


def _edits(graph, chain, kind):
  return [
    e
    for seed in range(8)
    if (e := chain_edits.mention_edit(graph, chain, kind, np.random.default_rng(seed)))
  ]


@pytest.mark.parametrize('domain,text', [('medical', CXR), ('driving', ROAD)])
@pytest.mark.parametrize('kind', ['synonym', 'contradict'])
def test_mention_edit_changes_only_the_replaced_mention(domain, text, kind):
  graph = load_graph(domain)
  chain = chain_edits.record_chain(text)
  assert chain == text[: text.index('</think>') + len('</think>')]
  a, _ = free_text.parse_report(graph, chain)
  spans = {(m.start, m.end): m for m in free_text.mentions(graph, chain)}
  edits = _edits(graph, chain, kind)
  assert edits
  for e in edits:
    ((start, end, new),) = e.replaced  # one mention, replaced in place
    mention = spans[(start, end)]
    assert e.concepts == (mention.concept,)
    written = e.chain[start : len(e.chain) - (len(chain) - end)]
    assert e.chain[:start] == chain[:start] and e.chain[start + len(written) :] == chain[end:]
    assert written.lower() == new.lower() != chain[start:end].lower()
    assert written[:1].isupper() == chain[start:end][:1].isupper()
    b, _ = free_text.parse_report(graph, e.chain)
    assert b == e.assignment
    if kind == 'synonym':
      assert b == a and e.expected_decision == graph.decide(a)
    else:
      assert not mention.negated  # a negation cue would read any term back as the neutral value
      assert [c for c in a if a[c] != b[c]] == [mention.concept]
      assert e.expected_decision == graph.decide(b) != graph.decide(a)
  if kind == 'synonym':  # different seeds pick different mentions or terms
    assert len({e.chain for e in edits}) > 1


def test_negated_mention_keeps_its_cue():
  graph = load_graph('medical')
  chain = chain_edits.record_chain(CXR)
  e = chain_edits.mention_edit(
    graph, chain, 'synonym', np.random.default_rng(0), among=('pneumothorax_line',)
  )
  assert 'No pneumothorax.' not in e.chain and e.chain.count('No ') == 1
  assert free_text.parse_report(graph, e.chain)[0]['pneumothorax_line'] == 'absent'
  none = chain_edits.mention_edit(
    graph, chain, 'contradict', np.random.default_rng(0), among=('pneumothorax_line',)
  )
  assert none is None  # its only mention is negated


def test_no_mention_no_chain_no_edit():
  graph = load_graph('medical')
  chain = chain_edits.record_chain(NO_MENTION)
  assert free_text.mentions(graph, chain) == []
  for kind in ('synonym', 'contradict'):
    assert chain_edits.mention_edit(graph, chain, kind, np.random.default_rng(0)) is None
  assert chain_edits.record_chain(NO_CHAIN) is None
  assert chain_edits.record_chain('<think> open chain') is None


# ----------------------------------------------------------------------------- the probes


@pytest.fixture(scope='module')
def model(processors):
  config = models.get_config_for_tokens('tiny', processors.ids)
  return models.Qwen2_5_VL(config, rngs=nnx.Rngs(0))


@pytest.fixture(scope='module')
def real(processors, tmp_path_factory):
  """A swift_jsonl split of free-text records: (source, eval batches)."""
  root = tmp_path_factory.mktemp('swift')
  (root / 'x.png').write_bytes(synth_cxr.make_example(0, 'test', 0)['image'])
  user = {'role': 'user', 'content': '<image>What is the disease of this patient?'}
  lines = [
    json.dumps(
      {
        'messages': [user, {'role': 'assistant', 'content': text}],
        'images': ['x.png'],
        'rejected_response': text,
      }
    )
    for text in (CXR, NO_MENTION, UNLABELLED, NO_CHAIN)
  ]
  (root / 'test.jsonl').write_text('\n'.join(lines) + '\n')
  source = sources.make_source('swift_jsonl', 'test', data_dir=str(root))
  batches = list(
    eval_batches.make_eval_batches(source, processors, batch_size=4, max_prompt_len=64)
  )
  # pleural_effusion, no_finding, unlabelled, cardiomegaly (named, but no chain to probe).
  assert batches[0]['decision'].tolist() == [1, 6, -1, 3]
  return source, batches


def test_drift_probe_on_record_chains(model, processors, real):
  source, batches = real
  graph = load_graph('medical')
  out = drift_probe.drift_probe(
    model, batches, processors=processors, graph=graph, rng_seed=0, source=source
  )
  assert out['chains'] == 'record'
  # Rows: CXR (labelled, mentions), NO_MENTION (labelled), UNLABELLED (mentions), NO_CHAIN
  # (labelled).
  assert out['n'] == 2  # teacher-forced: the labelled rows with a chain
  assert out['not_applicable'] == {
    'outcome_shift': 2,  # NO_MENTION, NO_CHAIN
    'counterfactual_shift': 2,
    'counterfactual_follow': 3,  # only CXR has a label the graph reads from its chain
    'teacher_forced_accuracy': 2,  # UNLABELLED, NO_CHAIN
  }
  per = out['per_concept']
  assert per['effusion']['n_synonym'] == 2 and per['effusion']['n_counterfactual'] == 2
  assert per['hyperinflation']['n_synonym'] == 0 and per['hyperinflation']['outcome_shift'] is None
  for key in ('outcome_shift', 'counterfactual_shift', 'counterfactual_follow'):
    assert 0.0 <= out[key] <= 1.0
  json.dumps(out, allow_nan=False)


def test_thinking_interference_on_record_chains(model, processors, real):
  source, batches = real
  details = interference.interference_details(
    model,
    lambda: iter(batches),
    processors=processors,
    graph=load_graph('medical'),
    kinds_and_severities={'synonym': (1, 2), 'contradict': (1,)},
    max_new_tokens=4,
    rng_seed=0,
    source=source,
  )
  assert details['none']['0']['n'] == 3 and details['none']['0']['unlabelled'] == 1
  syn, two, con = details['synonym']['1'], details['synonym']['2'], details['contradict']['1']
  # Edits exist on CXR and UNLABELLED; only CXR has a label to score against.
  assert (syn['n'], syn['skipped'], syn['not_applicable']) == (1, 2, 3)
  assert (con['n'], con['skipped'], con['not_applicable']) == (1, 2, 3)
  assert two['n'] == 1 and syn['own_chain'] == 0.0  # the record's chain, never the model's
  assert interference.not_applicable(details) == {
    'synonym': {'1': 3, '2': 3},
    'contradict': {'1': 3},
  }
  json.dumps(details, allow_nan=False)


def test_synthetic_probes_never_score_unlabelled_rows(model, processors):
  source = sources.make_source('synth_drive', 'test', num_examples=4)
  (batch,) = eval_batches.make_eval_batches(source, processors, batch_size=4, max_prompt_len=64)
  graph = load_graph('driving')
  kw = dict(processors=processors, graph=graph, rng_seed=0)
  full = drift_probe.drift_probe(model, [batch], **kw)
  assert full['chains'] == 'graph' and full['n'] == 4
  assert full['not_applicable']['teacher_forced_accuracy'] == 0
  unlabelled = dict(batch, decision=np.where(np.arange(4) == 0, -1, batch['decision']))
  out = drift_probe.drift_probe(model, [unlabelled], **kw)
  assert out['n'] == 3 and out['not_applicable']['teacher_forced_accuracy'] == 1
  a0 = graph.assignment_from_ids(batch['concepts'][0])
  followed = any(  # row 0 had a decision-changing edit: its follow was scored, now it is not
    chain_edits.contradict_edit(graph, a0, np.random.default_rng(0), among=(c,))
    for c in graph.concept_names
  )
  assert out['not_applicable']['counterfactual_follow'] == (
    full['not_applicable']['counterfactual_follow'] + followed
  )
  # The shifts need no label: unchanged.
  assert out['outcome_shift'] == full['outcome_shift']
  assert out['counterfactual_shift'] == full['counterfactual_shift']
  details = interference.interference_details(
    model,
    lambda: iter([batch]),
    kinds_and_severities={'contradict': (1,)},
    max_new_tokens=4,
    source=source,
    **kw,
  )
  cell = details['contradict']['1']
  assert cell['not_applicable'] == cell['skipped'] == 4 - cell['n']
