"""Shortcut-aimed thinking pairs (data.thinking_target): the nuisance -> decision map read from
the labels, rejected chains that reach the nuisance's decision by a minimal rewrite, counted
fallbacks, re-rendered disagreeing scenes, and the config's guards."""

import numpy as np
import pytest

from cpo_jax.data import datasets
from cpo_jax.data import pairs as pairs_lib
from cpo_jax.data import processors
from cpo_jax.data import sources
from cpo_jax.data import thinking_pairs as tp
from cpo_jax.knowledge import load_graph
from cpo_jax.knowledge.rewriter import candidate_rewrites
from cpo_jax.knowledge.rewriter import nearest_rewrites


@pytest.fixture(scope='module')
def drive():
  return sources.make_source('synth_drive', 'train', num_examples=400), load_graph('driving')


def _hamming(a, b):
  return sum(a[k] != b[k] for k in a)


def _planned_pairs(source, g, plan):
  """(position, record, kind, goal, pair) for every record of `source`, thinking pairs only."""
  rng = np.random.default_rng(0)
  for i in range(len(source)):
    rec = source[i]
    kind, goal = plan.kind_of(int(rec['decision']), int(rec['nuisance']), g, i)
    pair = pairs_lib.make_pair(
      rec, i, rng, graph=g, source=source, index=None, thinking_fraction=1.0, thinking=plan
    )
    yield i, rec, kind, goal, pair


def test_the_map_reads_the_shortcut_from_the_labels():
  # Value 0 names decision 0. Under value 1, decision 0 is still the most frequent but less so
  # than overall (dropped), 1 and 2 are half as frequent and likelier than overall (kept).
  # Value 2 is unseen; nuisance -1 (unknown) counts nowhere.
  decision = [0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3]
  nuisance = [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, -1]
  m = tp.ShortcutMap.from_labels(decision, nuisance, num_decisions=4, num_values=3)
  assert m.predicts == ((0,), (1, 2), ())
  assert m.decisions_for(-1) == () and m.decisions_for(7) == ()


@pytest.mark.parametrize('name,graph', [('synth_drive', 'driving'), ('synth_cxr', 'medical')])
def test_on_the_synthetic_train_split_the_map_is_the_shortcut_sft_can_learn(name, graph):
  g = load_graph(graph)
  decision, nuisance = tp.split_labels(sources.make_source(name, 'train', num_examples=600))
  m = tp.ShortcutMap.from_labels(decision, nuisance, len(g.decisions), len(g.nuisance_values))
  hit = np.array([d in m.decisions_for(v) for d, v in zip(decision, nuisance)])
  assert hit.mean() > 0.8  # the nuisance alone names the decision (90% by construction)
  assert all(m.predicts)  # every value predicts something
  if graph == 'driving':  # one decision per sky
    assert m.describe(g) == 'night -> stop, fog -> slow_down, day -> proceed, dusk -> change_lane'


def test_aimed_pairs_reject_the_nuisance_decision_with_a_minimal_rewrite(drive, caplog):
  source, g = drive
  with caplog.at_level('WARNING'):
    plan = tp.plan_for(source, g, target='shortcut')
  assert 'aimed' in caplog.text and 'agrees_random' in caplog.text  # logged with the shares
  kinds = {k: 0 for k in plan.counts}
  for _, rec, kind, goal, pair in _planned_pairs(source, g, plan):
    kinds[kind] += 1
    a = g.assignment_from_ids(rec['concepts'])
    b, _ = g.parse_chain(pair['rejected_completion'])
    assert g.decide(b) == g.parse_decision(pair['rejected_completion']) != g.decide(a)
    assert pair['chosen_completion'] == pairs_lib.completion_of(rec)
    if kind == tp.AIMED:
      assert pair['rejected_decision'] in plan.shortcut.decisions_for(int(rec['nuisance']))
      fewest = min(
        _hamming(a, c) for c in g.all_assignments() if g.decision_id(g.decide(c)) in goal
      )
      assert _hamming(a, b) == fewest
  assert kinds == plan.counts
  assert 0 < plan.counts[tp.AIMED] < plan.counts[tp.AGREES]  # ~10% / ~90% of train


@pytest.mark.parametrize('first_index', [0, 1000])  # 1000: later scenes (data.cpo_scenes)
def test_rerendered_pairs_reject_the_shortcut_answer_on_a_disagreeing_scene(first_index):
  g = load_graph('driving')
  source = sources.make_source('synth_drive', 'train', num_examples=40, first_index=first_index)
  plan = tp.plan_for(source, g, target='shortcut_rerender')
  assert plan.counts[tp.AGREES] == 0 and plan.counts[tp.RERENDERED] > 0
  rng, seen = np.random.default_rng(0), 0
  for i in range(40):
    rec = source[i]
    if plan.kind_of(int(rec['decision']), int(rec['nuisance']), g, i)[0] != tp.RERENDERED:
      continue
    seen += 1
    pair = pairs_lib.make_pair(
      rec, i, rng, graph=g, source=source, index=None, thinking_fraction=1.0, thinking=plan
    )
    predicted = plan.shortcut.decisions_for(int(rec['nuisance']))
    assert rec['decision'] in predicted and pair['chosen_decision'] not in predicted
    assert pair['rejected_completion'] == pairs_lib.completion_of(rec)  # the shortcut's answer
    assert pair['chosen_image'] == pair['rejected_image'] != rec['image']
    chosen, _ = g.parse_chain(pair['chosen_completion'])
    a = g.assignment_from_ids(rec['concepts'])
    assert g.decision_id(g.decide(chosen)) == pair['chosen_decision']
    allowed = [d for j, d in enumerate(g.decisions) if j not in predicted]
    assert chosen in nearest_rewrites(g, a, allowed)
    rerender = source.counterfactual(i, chosen)  # the scene the chosen chain describes
    assert rerender['image'] == pair['chosen_image']
    same_scene = source.counterfactual(i, a)['image'] == rec['image']  # its own layout and noise
    assert same_scene
    np.testing.assert_array_equal(pair['boxes'], rerender['boxes'])
  assert seen > 20


def test_balanced_pairs_leave_the_nuisance_predicting_nothing_on_either_side(drive, caplog):
  # 90% of train agrees with its sky; re-rendering 1 - 0.25 / 0.9 of those leaves a quarter
  # agreeing (chance: one decision of four per sky) on the chosen side, and the random
  # negatives agree about as often, so no side can be told from the other by the sky.
  source, g = drive
  with caplog.at_level('WARNING'):
    plan = tp.plan_for(source, g, target='balanced')
  assert 'disagrees_random' in caplog.text
  agree = np.mean([d in plan.shortcut.decisions_for(v) for d, v in zip(*tp.split_labels(source))])
  assert plan.rerender_share == pytest.approx(1 - 0.25 / agree)
  chosen_agrees, rejected_agrees, kinds = [], [], {k: 0 for k in plan.counts}
  for _, rec, kind, _, pair in _planned_pairs(source, g, plan):
    kinds[kind] += 1
    predicted = plan.shortcut.decisions_for(int(rec['nuisance']))
    chosen, _ = g.parse_chain(pair['chosen_completion'])
    rejected, _ = g.parse_chain(pair['rejected_completion'])
    assert g.decision_id(g.decide(chosen)) == pair['chosen_decision'] != pair['rejected_decision']
    assert g.decision_id(g.decide(rejected)) == pair['rejected_decision']
    if kind == tp.RERENDERED:
      assert pair['chosen_image'] == pair['rejected_image'] != rec['image']
      assert rec['decision'] in predicted and pair['chosen_decision'] not in predicted
    else:
      assert pair['chosen_completion'] == pairs_lib.completion_of(rec)
    chosen_agrees.append(pair['chosen_decision'] in predicted)
    rejected_agrees.append(pair['rejected_decision'] in predicted)
  assert kinds == plan.counts and plan.counts[tp.AIMED] == 0
  assert abs(np.mean(chosen_agrees) - 0.25) < 0.07, np.mean(chosen_agrees)
  assert abs(np.mean(rejected_agrees) - 0.25) < 0.07, np.mean(rejected_agrees)
  # the same records are re-rendered whatever the order the pipeline asks in
  again = [
    plan.kind_of(int(source[i]['decision']), int(source[i]['nuisance']), g, i)[0] for i in (5, 3)
  ]
  assert again == [
    plan.kind_of(int(source[i]['decision']), int(source[i]['nuisance']), g, i)[0] for i in (5, 3)
  ]


def test_a_balanced_scene_is_drawn_by_position_so_every_arm_shows_the_same_one(drive):
  # The arms on one seed (dpo_random, cpo_plus, reference-picked negatives) and the selection
  # pass draw other random numbers per pair; the scene a position shows must not depend on them.
  source, g = drive
  plan = tp.plan_for(source, g, target='balanced')
  kinds = set()
  for i in range(40):
    first, second = (plan.pair(source[i], i, g, source, np.random.default_rng(s)) for s in (0, 1))
    assert first['chosen_image'] == second['chosen_image']
    assert first['chosen_completion'] == second['chosen_completion']
    kinds.add(plan.kind_of(int(source[i]['decision']), int(source[i]['nuisance']), g, i)[0])
  assert tp.RERENDERED in kinds


def _pair_of(source, g, i, plan, **kw):
  """The pipeline's pair of record i under `plan` (its random stream seeded by i)."""
  return pairs_lib.make_pair(
    source[i], i, np.random.default_rng(i), graph=g, source=source, index=None, thinking=plan, **kw
  )


def test_balanced_scenes_with_random_negatives_keep_the_scene_and_reject_another_record(drive):
  # The DPO baseline on the same chosen scenes: data.thinking_negative='random' with 'balanced'.
  source, g = drive
  plan = tp.plan_for(source, g, target='balanced', negative='random')
  same_plan = tp.plan_for(source, g, target='balanced')
  for i in range(60):
    rec = source[i]
    pair = _pair_of(source, g, i, plan, thinking_fraction=1.0, thinking_negative='random')
    rng = np.random.default_rng(i)
    rng.random()  # make_pair draws the pair's kind first
    own = same_plan.pair(rec, i, g, source, rng)
    assert (
      pair['chosen_image'] == own['chosen_image']
      and pair['chosen_completion'] == own['chosen_completion']
    )
    other = source[pair['rejected_index']]
    assert pair['rejected_index'] != i
    assert (
      pair['rejected_completion'] == pairs_lib.completion_of(other) != pair['chosen_completion']
    )
    assert pair['rejected_decision'] == other['decision']


def test_without_a_nuisance_every_pair_falls_back_and_is_counted(drive, caplog):
  source, g = drive
  records = [dict(source[i], nuisance=-1) for i in range(8)]
  with caplog.at_level('WARNING'):
    plan = tp.plan_for(records, g, target='shortcut')
  assert plan.counts[tp.NO_SHORTCUT] == 8 and "no_shortcut_random 8 (100.0%)" in caplog.text
  pair = plan.pair(records[0], 0, g, records, np.random.default_rng(0))
  assert pair['rejected_decision'] != records[0]['decision']


def test_candidate_rewrites_are_minimal_distinct_and_seeded():
  g = load_graph('driving')
  for a in g.all_assignments():
    every = candidate_rewrites(g, a, k=99)
    assert {g.decide(b) for b in every} == set(g.decisions) - {g.decide(a)}
    for b in every:
      assert b in nearest_rewrites(g, a, [g.decide(b)])
    few = candidate_rewrites(g, a, k=2, seed=3)
    assert few == candidate_rewrites(g, a, k=2, seed=3) and len(few) == min(2, len(every))
    assert all(b in every for b in few)


@pytest.mark.parametrize('target', ['shortcut', 'shortcut_rerender', 'balanced'])
def test_the_pipeline_makes_the_targeted_pairs(drive, target):
  _, g = drive
  small = sources.make_source('synth_drive', 'train', num_examples=32)
  plan = tp.plan_for(small, g, target=target)
  batch = next(
    datasets.make_cpo_iterator(
      small,
      processors.make_processors(None),
      batch_size=16,
      max_len=96,
      graph=g,
      thinking_fraction=1.0,
      pair_layout=(1, 1),
      thinking=plan,
    )
  )
  kinds = []
  for row, index in enumerate(batch['index']):
    rec = small[int(index)]
    kind, goal = plan.kind_of(int(rec['decision']), int(rec['nuisance']), g, int(index))
    kinds.append(kind)
    if kind == tp.AIMED:
      assert batch['rejected_decision'][row] in goal
      assert batch['chosen_decision'][row] == rec['decision']
    if kind == tp.RERENDERED:  # a new scene whose evidence leaves the nuisance's decision
      assert batch['chosen_decision'][row] in goal
      if target == 'shortcut_rerender':  # rejecting the shortcut's answer
        assert batch['rejected_decision'][row] == rec['decision']
  assert tp.AGREES in kinds if target == 'shortcut' else tp.RERENDERED in kinds


def test_the_config_guards(drive):
  source, g = drive
  with pytest.raises(ValueError, match='thinking_target'):
    tp.plan_for(source, g, target='nearest')
  with pytest.raises(ValueError, match='both choose'):
    tp.plan_for(source, g, target='shortcut', select='reference')
  with pytest.raises(ValueError, match='needs the selection pass'):  # a combination allowed
    tp.plan_for(source, g, target='balanced', select='reference')
  with pytest.raises(ValueError, match="thinking_negative='random'"):
    tp.plan_for(source, g, target='balanced', select='reference', negative='random')
  with pytest.raises(ValueError, match="thinking_negative='random'"):
    tp.plan_for(source, g, target='shortcut', negative='random')
  with pytest.raises(ValueError, match='cannot'):
    tp.plan_for([source[0], source[1]], g, target='shortcut_rerender')
  with pytest.raises(ValueError, match='cannot'):
    tp.plan_for([source[0], source[1]], g, target='balanced')
  assert tp.plan_for(source, g) is None  # the default: the random rewrite, no plan


def test_counterfactual_perception_pairs_show_the_balanced_scene_and_flip_one_concept(drive):
  # With 'balanced', a perception pair with a counterfactual image starts from the same scene a
  # thinking pair of that record shows; its rejected image flips one concept of that scene.
  source, g = drive
  plan = tp.plan_for(source, g, target='balanced')
  rerendered = 0
  for i in range(40):
    rec = source[i]
    pair = _pair_of(source, g, i, plan, thinking_fraction=0.0, perception_mode='counterfactual')
    thinking = plan.pair(rec, i, g, source, np.random.default_rng(0))
    assert pair['chosen_image'] == thinking['chosen_image']
    assert pair['chosen_completion'] == pair['rejected_completion'] == thinking['chosen_completion']
    b = plan.balanced_scene_of(rec, i, g)
    scene = g.assignment_from_ids(rec['concepts']) if b is None else b
    assert pair['chosen_decision'] == g.decision_id(g.decide(scene))
    flipped = g.concepts[pair['flipped_concept']].name
    rejected = [dict(scene, **{flipped: v}) for v in g.concepts[pair['flipped_concept']].values]
    assert pair['rejected_image'] in [source.counterfactual(i, r)['image'] for r in rejected]
    assert pair['rejected_image'] != pair['chosen_image']
    rerendered += b is not None
  assert 0 < rerendered < 40
