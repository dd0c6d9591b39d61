"""Robustness measurements: chain edits on the real driving graph, perception interference on
real eval batches, and the teacher-forced answer distribution of a tiny random model."""

import dataclasses
import json

from flax import nnx
import jax
import numpy as np
import pytest

from cpo_jax import models
from cpo_jax import perturb
from cpo_jax.data import eval_batches
from cpo_jax.data import sources
from cpo_jax.evaluate import chain_edits
from cpo_jax.evaluate import drift_probe
from cpo_jax.evaluate import interference
from cpo_jax.evaluate import plots
from cpo_jax.evaluate import scoring
from cpo_jax.knowledge import drift


@pytest.fixture(scope='module')
def batches(processors):
  source = sources.make_source('synth_drive', 'test', num_examples=6)
  # 6 examples in batches of 4: the second batch has 2 filler rows (valid=False).
  return list(eval_batches.make_eval_batches(source, processors, batch_size=4, max_prompt_len=64))


@pytest.fixture(scope='module')
def model(processors):
  ids = processors.ids
  config = models.get_config_for_tokens('tiny', ids)
  return models.Qwen2_5_VL(config, rngs=nnx.Rngs(0))


def _layout(processors):
  return perturb.PatchLayout.from_processor(processors.image_processor)


# ----------------------------------------------------------------------------- pure helpers


def test_total_variation_properties():
  rng = np.random.default_rng(0)
  p = rng.dirichlet(np.ones(4), size=50)
  q = rng.dirichlet(np.ones(4), size=50)
  np.testing.assert_array_equal(scoring.total_variation(p, p), 0.0)
  tv = scoring.total_variation(p, q)
  assert tv.shape == (50,) and (tv >= 0).all() and (tv <= 1).all()
  np.testing.assert_allclose(tv, scoring.total_variation(q, p))
  assert scoring.total_variation([1, 0, 0, 0], [0, 0, 1, 0]) == 1.0
  assert scoring.total_variation([0.5, 0.5], [1.0, 0.0]) == pytest.approx(0.5)


def test_decision_tokens_first_token_or_sequence(graph, processors):
  tok = processors.tokenizer
  dt = scoring.decision_tokens(tok, graph)
  # ' stop', ' slow', ' proceed', ' change' differ: one next-token read.
  assert dt.scoring == 'first_token'
  names = [tok.convert_ids_to_tokens(list(s)) for s in dt.sequences]
  assert names[graph.decision_id('slow_down')] == [' slow', ' down', '.']
  assert dt.first_token_ids == tuple(eval_batches.decision_token_ids(processors, graph).tolist())
  # Two decisions starting with the same word force full-sequence scoring.
  shared = dataclasses.replace(
    graph, decision_texts=dict(graph.decision_texts, change_lane='slow lane')
  )
  dt2 = scoring.decision_tokens(tok, shared)
  assert dt2.first_token_ids is None and dt2.scoring == 'sequence'
  assert (
    dt2.sequences[graph.decision_id('change_lane')][0]
    == dt2.sequences[graph.decision_id('slow_down')][0]
  )


# ----------------------------------------------------------------------------- chain edits


@pytest.mark.parametrize('num_edits', [1, 2])
def test_synonym_edit_keeps_assignment_and_decision(graph, num_edits):
  for i, a in enumerate(graph.all_assignments()):
    edit = chain_edits.synonym_edit(graph, a, np.random.default_rng(i), num_edits=num_edits)
    parsed, used = graph.parse_chain(edit.chain)
    assert parsed == a
    assert graph.decide(parsed) == graph.decide(a) == edit.expected_decision
    assert len(edit.concepts) == num_edits
    for c in graph.concept_names:  # exactly the edited sentences changed
      assert (used[c] != graph.concept(c).phrases[a[c]]) == (c in edit.concepts)


@pytest.mark.parametrize('num_edits', [1, 2])
def test_contradict_edit_changes_decision(graph, num_edits):
  n_none = 0
  for i, a in enumerate(graph.all_assignments()):
    edit = chain_edits.contradict_edit(graph, a, np.random.default_rng(i), num_edits=num_edits)
    if edit is None:
      n_none += 1
      continue
    parsed, _ = graph.parse_chain(edit.chain)
    assert parsed == edit.assignment and graph.is_valid(parsed)
    assert sorted(c for c in a if parsed[c] != a[c]) == sorted(edit.concepts)
    assert len(edit.concepts) == num_edits
    assert graph.decide(parsed) == edit.expected_decision != graph.decide(a)
  assert n_none < len(graph.all_assignments()) // 2
  # A red light and a crossing pedestrian both say stop: one edit cannot change that.
  a = dict(traffic_light='red', pedestrian='crossing', lead_vehicle='none', cone='none')
  edit = chain_edits.contradict_edit(graph, a, np.random.default_rng(0), num_edits=num_edits)
  assert (edit is None) == (num_edits == 1)


def test_edits_keep_the_models_wording(graph):
  text = (
    '<think> The signal is red. Nobody is on the crosswalk. The car ahead is distant. '
    'No cone is in the lane. </think> The decision is stop.'
  )
  gold = dict(traffic_light='green', pedestrian='none', lead_vehicle='none', cone='none')
  a, sentences, own = chain_edits.base_chain(graph, text, gold)
  assert own and a == dict(traffic_light='red', pedestrian='none', lead_vehicle='far', cone='none')
  edit = chain_edits.contradict_edit(
    graph, a, np.random.default_rng(0), sentences=sentences, among=('traffic_light',)
  )
  assert edit.concepts == ('traffic_light',) and edit.expected_decision == 'proceed'
  assert 'Nobody is on the crosswalk.' in edit.chain and 'The car ahead is distant.' in edit.chain
  syn = chain_edits.synonym_edit(
    graph, a, np.random.default_rng(0), sentences=sentences, among=('traffic_light',)
  )
  assert 'The signal is red.' not in syn.chain and graph.parse_chain(syn.chain)[0] == a
  # Unusable chains fall back to the gold chain: unclosed, incomplete, self-contradicting.
  for bad in (
    '<think> The signal is red.',
    '<think> The signal is red. </think> stop',
    '<think> The signal is red. The light shows green. </think>',
  ):
    assert chain_edits.base_chain(graph, bad, gold) == (gold, {}, False)


# ----------------------------------------------------------------------------- perception


@pytest.mark.parametrize(
  'kind,severity', [('occlude', 1.0), ('mask_patches', 0.5), ('noise', 0.3), ('blur', 0.5)]
)
def test_perception_masks_change_pixels(batches, processors, kind, severity):
  batch = batches[0]
  out = interference.perturb_batch(
    batch, kind, severity, jax.random.key(0), layout=_layout(processors)
  )
  assert out['pixel_values'].shape == batch['pixel_values'].shape
  changed = (out['pixel_values'] != batch['pixel_values']).any(-1).reshape(4, -1)
  assert changed.any(-1).all()  # every image is touched
  for k in ('input_ids', 'attention_mask', 'decision', 'valid'):
    np.testing.assert_array_equal(out[k], batch[k])
  if kind == 'occlude':  # only patches overlapping an evidence box, and none at severity 0
    assert not changed.all()
    same = interference.perturb_batch(
      batch, kind, 0.0, jax.random.key(0), layout=_layout(processors)
    )
    np.testing.assert_array_equal(same['pixel_values'], batch['pixel_values'])


def test_image_swap_takes_an_image_with_another_decision(batches, processors):
  layout = _layout(processors)
  pool = {}
  rows = lambda b: np.asarray(b['pixel_values']).reshape(4, -1, layout.patch_dim)
  for batch in batches:
    out, donor = interference.swap_images(batch, 1.0, np.random.default_rng(0), pool, layout=layout)
    x, y = rows(batch), rows(out)
    for i in np.flatnonzero(out['valid']):
      assert donor[i] >= 0 and donor[i] != batch['decision'][i]
      assert not np.array_equal(y[i], x[i])
    assert not out['valid'][~np.asarray(batch['valid'])].any()
  assert set(pool) == {int(d) for b in batches for d, v in zip(b['decision'], b['valid']) if v}
  # Half the image tokens (merge windows of 4 rows) come from the donor, half stay.
  half, _ = interference.swap_images(batches[0], 0.5, np.random.default_rng(1), {}, layout=layout)
  changed = (rows(half) != rows(batches[0])).any(-1).reshape(4, -1, 4).any(-1)
  valid = np.asarray(half['valid'])
  assert (changed.sum(-1)[valid] <= changed.shape[1] // 2).all() and changed[valid].any(-1).all()
  none, _ = interference.swap_images(batches[0], 0.0, np.random.default_rng(1), {}, layout=layout)
  np.testing.assert_array_equal(none['pixel_values'], batches[0]['pixel_values'])


# ----------------------------------------------------------------------------- answer distribution


def test_scorer_matches_the_full_forward(model, processors, graph, batches):
  """Both scoring modes against ONE plain model(...) call: pixels through the vision tower,
  rows right padded instead of left padded (causal: padding after a read cannot change it)."""
  tok = processors.tokenizer
  shared = dataclasses.replace(
    graph, decision_texts=dict(graph.decision_texts, change_lane='slow lane')
  )
  scorers = [scoring.AnswerScorer(model, processors, g) for g in (graph, shared)]
  assert [s.tokens.scoring for s in scorers] == ['first_token', 'sequence']
  batch, rows = batches[0], (0, 3)
  chains = [graph.chain_text(graph.assignment_from_ids(c)) for c in batch['concepts']]
  heads = [
    batch['input_ids'][r][batch['attention_mask'][r] == 1].tolist()
    + tok(f'{chains[r]} {drift.answer_prefix(graph)}', add_special_tokens=False)['input_ids']
    for r in rows
  ]
  seqs = list(dict.fromkeys(s for sc in scorers for s in sc.tokens.sequences))  # 5 distinct answers
  ref_rows = [h + list(s[:-1]) for h in heads for s in seqs]
  length = max(map(len, ref_rows))
  ids = np.zeros((len(ref_rows), length), np.int32)
  mask = np.zeros_like(ids)
  for i, r in enumerate(ref_rows):
    ids[i, : len(r)], mask[i, : len(r)] = r, 1
  pixels = np.asarray(batch['pixel_values']).reshape(4, -1, batch['pixel_values'].shape[-1])
  pixels = np.repeat(pixels[list(rows)], len(seqs), axis=0).reshape(-1, pixels.shape[-1])
  grid = np.repeat(batch['image_grid_thw'][:1], len(ref_rows), axis=0)
  positions, _ = models.get_rope_index(ids, mask, grid, model.config)
  forward = nnx.jit(
    lambda m, i, a, pv, pos: m(i, a, pixel_values=pv, image_grid_thw=grid, position_ids=pos)
  )
  logits = forward(model, ids, mask, pixels, positions)  # jit: eager dispatch is slower here
  logp = np.asarray(jax.nn.log_softmax(logits.astype(np.float32), -1), np.float64)
  logp = logp.reshape(len(rows), len(seqs), length, -1)

  for scorer in scorers:
    p = scorer.distributions(batch, chains, scorer.encode(batch))
    assert p.shape == (4, len(graph.decisions))
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-9)
    for k, (r, head) in enumerate(zip(rows, heads)):
      if scorer.tokens.scoring == 'first_token':
        ref = scoring.softmax(logp[k, 0, len(head) - 1, list(scorer.tokens.first_token_ids)])
      else:
        ref = scoring.softmax(
          [
            sum(logp[k, seqs.index(s), len(head) - 1 + j, t] for j, t in enumerate(s))
            for s in scorer.tokens.sequences
          ]
        )
      np.testing.assert_allclose(p[r], ref, atol=2e-5)
  # The same chains give the same distribution: zero shift.
  again = scorers[0].distributions(batch, chains, scorers[0].encode(batch))
  first = scorers[0].distributions(batch, chains, scorers[0].encode(batch))
  np.testing.assert_array_equal(scoring.total_variation(first, again), 0.0)


def test_drift_probe_report(model, processors, graph, batches):
  out = drift_probe.drift_probe(model, batches, processors=processors, graph=graph, rng_seed=0)
  assert out['n'] == 6 and out['scoring'] == 'first_token'
  for key in (
    'outcome_shift',
    'counterfactual_shift',
    'counterfactual_follow',
    'teacher_forced_accuracy',
  ):
    assert 0.0 <= out[key] <= 1.0, key
  assert set(out['per_concept']) == set(graph.concept_names)
  for row in out['per_concept'].values():
    assert row['n_synonym'] == 6  # every value of every concept has a near-synonym
    assert 0 <= row['n_counterfactual'] <= 6
    assert 0.0 <= row['outcome_shift'] <= 1.0
  # The overall shift is the mean over all (example, concept) substitutions.
  n = sum(r['n_synonym'] for r in out['per_concept'].values())
  mean = sum(r['outcome_shift'] * r['n_synonym'] for r in out['per_concept'].values()) / n
  assert out['outcome_shift'] == pytest.approx(mean)
  json.dumps(out, allow_nan=False)


def test_interference_report(model, processors, graph, batches):
  kinds = {'occlude': (1.0,), 'image_swap': (1.0,), 'synonym': (1,), 'contradict': (1,)}
  details = interference.interference_details(
    model,
    lambda: iter(batches),
    processors=processors,
    graph=graph,
    kinds_and_severities=kinds,
    max_new_tokens=4,
    rng_seed=0,
  )
  report = interference.accuracies(details)
  assert set(report) == {'none', *kinds}
  for kind, sevs in kinds.items():
    assert set(report[kind]) == {str(s) for s in sevs}
  assert details['none']['0']['n'] == details['occlude']['1.0']['n'] == 6
  # 4 new tokens cannot close a chain: every answer is unparsed, thinking uses the gold chains.
  assert details['none']['0']['unparsed'] == 6 and report['none']['0'] == 0.0
  assert details['synonym']['1']['own_chain'] == 0.0
  assert details['contradict']['1']['n'] + details['contradict']['1']['skipped'] == 6
  for cells in report.values():
    for acc in cells.values():
      assert 0.0 <= acc <= 1.0
  json.dumps(details, allow_nan=False)


def test_plot_robustness(tmp_path):
  section = {
    'interference': {
      'none': {'0': 0.9},
      'occlude': {'0.5': 0.7, '1.0': 0.4},
      'noise': {'0.1': 0.85},
      'synonym': {'1': 0.8, '2': 0.75},
      'contradict': {'1': 0.6},
    },
    'drift': {
      'outcome_shift': 0.1,
      'counterfactual_shift': 0.7,
      'per_concept': {'cone': {'outcome_shift': 0.05, 'counterfactual_shift': None}},
    },
  }
  path = tmp_path / 'robustness.png'
  plots.plot_robustness(section, str(path))
  assert path.stat().st_size > 1000
