"""Reference-picked counterfactuals (data.thinking_select='reference'): the pass keeps, per
record, the 2 candidates of highest reference log-prob (checked against scoring each candidate
alone, the straightforward way), is deterministic, resumes a cut pass, and feeds the pairs."""

from flax import nnx
import jax
import numpy as np
import pytest

from cpo_jax import config_defaults
from cpo_jax import models
from cpo_jax import sharding
from cpo_jax.data import bad_records
from cpo_jax.data import datasets
from cpo_jax.data import pairs as pairs_lib
from cpo_jax.data import processors
from cpo_jax.data import sources
from cpo_jax.data import streams
from cpo_jax.data import thinking_pairs
from cpo_jax.data.packing import pack_right
from cpo_jax.knowledge import load_graph
from cpo_jax.knowledge.rewriter import nearest_rewrites
from cpo_jax.train import completion
from cpo_jax.train import counterfactual_selection as selection_lib
from cpo_jax.train import stages

MAX_LEN = 96
K = 4


@pytest.fixture(scope='module')
def setup():
  proc = processors.make_processors(None)
  source = sources.make_source('synth_drive', 'train', num_examples=8)
  model = models.Qwen2_5_VL(models.get_config_for_tokens('tiny', proc.ids), rngs=nnx.Rngs(0))
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})  # 8 simulated devices
  return proc, source, load_graph('driving'), model, mesh


def _select(setup, path, source=None, save_every=50, **kw):
  proc, default_source, graph, model, mesh = setup
  return selection_lib.select_counterfactuals(
    model,
    source=source or default_source,
    proc=proc,
    graph=graph,
    grid=proc.static_grid,
    mesh=mesh,
    k=K,
    seed=0,
    rows_per_batch=8,
    max_len=MAX_LEN,
    path=path,
    save_every=save_every,
    **kw,
  )


@pytest.fixture(scope='module')
def alone(setup):
  """log pi(candidate | image, prompt) of one row at a time, every position projected to the
  vocabulary (no completion slab, no mesh): the straightforward way."""
  proc, _, graph, model, _ = setup
  graphdef, state = nnx.split(model)

  @jax.jit
  def logp(state, inputs):
    return completion.completion_logps(
      nnx.merge(graphdef, state),
      inputs['input_ids'],
      inputs['attention_mask'],
      inputs['loss_mask'],
      inputs['position_ids'],
      pixel_values=inputs['pixel_values'],
      image_grid_thw=proc.static_grid[None],
    ).total[0]

  def score(record, assignment):
    pv, grid = proc.image_inputs(record['image'])
    prompt = proc.prompt_ids(graph.question, proc.num_image_tokens(grid))
    completion_ids = proc.completion_ids(graph.completion_text(assignment))
    ids, attn, loss = pack_right(prompt, completion_ids, MAX_LEN, proc.ids['pad_token_id'], 'row')
    batch = {
      'input_ids': ids[None],
      'attention_mask': attn[None],
      'loss_mask': loss[None],
      'pixel_values': pv,
      'image_grid_thw': grid[None],
    }
    return float(logp(state, stages.step_inputs(batch, grid, model.config)))

  return score


def test_the_kept_candidates_are_the_top_two_by_reference_log_prob(setup, alone, tmp_path):
  _, source, graph, _, _ = setup
  table = _select(setup, tmp_path / 'sel.npz')
  assert table.chosen.shape == (len(source), 2, len(graph.concepts))
  for m in range(len(source)):
    record = source[m]
    a = graph.assignment_from_ids(record['concepts'])
    cands = [graph.assignment_from_ids(c) for c in table.candidates[m] if c[0] >= 0]
    # Every candidate is a minimal rewrite toward its own decision, none repeated.
    assert 3 <= len(cands) <= K and len({tuple(sorted(b.items())) for b in cands}) == len(cands)
    for b in cands:
      assert b in nearest_rewrites(graph, a, [graph.decide(b)])
    alone_scores = np.array([alone(record, b) for b in cands])
    np.testing.assert_allclose(table.scores[m, : len(cands)], alone_scores, rtol=1e-4, atol=1e-3)
    top = [cands[j] for j in np.argsort(-alone_scores, kind='stable')[:2]]
    assert [graph.assignment_from_ids(c) for c in table.chosen[m]] == top
    # The pair's rejected chain is one of the two.
    pair = table_plan(table).pair(record, m, graph, source, np.random.default_rng(m))
    assert pair['rejected_completion'] in [graph.completion_text(b) for b in top]


def table_plan(table):
  return thinking_pairs.ThinkingPlan('random', selection=table)


def test_the_selection_is_deterministic_and_read_back(setup, tmp_path):
  first = _select(setup, tmp_path / 'a.npz')
  again = _select(setup, tmp_path / 'b.npz')
  for name in ('candidates', 'scores', 'chosen', 'positions'):
    np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
  with np.load(tmp_path / 'a.npz') as f:
    np.testing.assert_array_equal(f['chosen'], first.chosen)
  read = _select(setup, tmp_path / 'a.npz', source=_Broken(setup[1], at=-1))  # no record read
  np.testing.assert_array_equal(read.scores, first.scores)


class _Broken:
  """The source, unreadable at position `at` (-1: at every position): labels stay readable."""

  def __init__(self, inner, at):
    self.inner, self.at = inner, at

  def __len__(self):
    return len(self.inner)

  def labels(self):
    return self.inner.labels()

  def __getitem__(self, i):
    if self.at in (-1, i):
      raise RuntimeError('disk lost')
    return self.inner[i]

  def __repr__(self):
    return 'broken'


def test_a_cut_pass_resumes_from_its_stored_rows(setup, tmp_path, caplog):
  path = tmp_path / 'cut.npz'
  with pytest.raises(bad_records.BadRecordError, match='disk lost'):
    _select(setup, path, source=_Broken(setup[1], at=7), save_every=1)
  with np.load(path) as f:
    stored = len(f['row_scores'])
  assert 0 < stored < len(selection_plan(setup).rows)
  with caplog.at_level('WARNING'):
    resumed = _select(setup, path)
  assert f'has {stored} of' in caplog.text
  whole = _select(setup, tmp_path / 'whole.npz')
  np.testing.assert_array_equal(resumed.scores, whole.scores)
  np.testing.assert_array_equal(resumed.chosen, whole.chosen)


def selection_plan(setup):
  _, source, graph, _, _ = setup
  positions = selection_lib.shard_positions(len(source))
  return selection_lib.candidate_plan(
    graph, positions, selection_lib.shard_concepts(source, positions), k=K, seed=0
  )


def test_a_selection_for_other_records_is_an_error(setup, tmp_path):
  proc, source, graph, _, _ = setup
  _select(setup, tmp_path / 's.npz')
  other = sources.make_source('synth_drive', 'train', num_examples=8, seed=1)
  with pytest.raises(ValueError, match='other records or candidates'):
    _select(setup, tmp_path / 's.npz', source=other)
  table = _select(setup, tmp_path / 's.npz')
  with pytest.raises(ValueError, match='made for another scene'):
    table.choices(0, np.asarray(source[0]['concepts']) + 1, graph)
  with pytest.raises(ValueError, match='is not in the counterfactual selection'):
    table.choices(99, source[0]['concepts'], graph)


def test_reference_selection_drives_the_pipeline(setup, tmp_path):
  proc, source, graph, _, _ = setup
  table = _select(setup, tmp_path / 'p.npz')
  plan = thinking_pairs.plan_for(source, graph, select='reference', selection=table)
  batch = next(
    datasets.make_cpo_iterator(
      source,
      proc,
      batch_size=8,
      max_len=MAX_LEN,
      graph=graph,
      thinking_fraction=1.0,
      pair_layout=(1, 1),
      thinking=plan,
    )
  )
  for index, rejected in zip(batch['index'], batch['rejected_decision']):
    picked = table.chosen[int(index)]
    assert rejected in [
      graph.decision_id(graph.decide(graph.assignment_from_ids(c))) for c in picked
    ]
  with pytest.raises(ValueError, match='needs the selection pass'):
    thinking_pairs.plan_for(source, graph, select='reference')
  # Perception pairs beside them keep their records' own scenes.
  pair = pairs_lib.make_pair(
    source[0],
    0,
    np.random.default_rng(0),
    graph=graph,
    source=source,
    index=None,
    thinking_fraction=0.0,
    perception_mode='counterfactual',
    thinking=plan,
  )
  assert pair['chosen_image'] == source[0]['image']


def test_an_unreadable_record_is_skipped_counted_once_and_never_paired(setup, tmp_path):
  _, source, graph, _, _ = setup
  skips = bad_records.SkipCounter()
  table = _select(
    setup, tmp_path / 'k.npz', source=_Broken(source, at=3), on_bad_record='skip', skips=skips
  )
  assert dict(skips.counts) == {'unreadable_record': 1}
  assert np.isnan(table.scores[3]).all() and (table.chosen[3] == -1).all()
  assert np.isfinite(table.scores[2, :3]).all()
  with pytest.raises(bad_records.BadRecordError, match='no candidate counterfactual'):
    table.choices(3, source[3]['concepts'], graph)


def test_balanced_scenes_reject_the_reference_picked_rewrites_of_the_scene_they_show(
  setup, alone, tmp_path
):
  # thinking_target='balanced' picks the scene (some records re-rendered), the reference which
  # of that scene's rewrites is rejected: the pass scores the candidates on the shown image.
  _, _, graph, _, _ = setup
  source = sources.make_source('synth_drive', 'train', num_examples=16)
  scenes = thinking_pairs.plan_for(source, graph, target='balanced')
  table = _select(setup, tmp_path / 'b.npz', source=source, scenes=scenes)
  plan = thinking_pairs.plan_for(
    source, graph, target='balanced', select='reference', selection=table
  )
  rerendered = 0
  for m in range(len(source)):
    record = source[m]
    b = scenes.balanced_scene(
      int(record['decision']), int(record['nuisance']), record['concepts'], m, graph
    )
    scene = graph.assignment_from_ids(record['concepts']) if b is None else b
    image = record['image'] if b is None else source.counterfactual(m, b)['image']
    assert graph.assignment_from_ids(table.record_concepts[m]) == scene
    cands = [graph.assignment_from_ids(c) for c in table.candidates[m] if c[0] >= 0]
    assert all(c in nearest_rewrites(graph, scene, [graph.decide(c)]) for c in cands)
    alone_scores = np.array([alone(dict(record, image=image), c) for c in cands])
    np.testing.assert_allclose(table.scores[m, : len(cands)], alone_scores, rtol=1e-4, atol=1e-3)
    top = [cands[j] for j in np.argsort(-alone_scores, kind='stable')[:2]]
    for seed in range(3):
      pair = plan.pair(record, m, graph, source, np.random.default_rng(seed))
      assert pair['chosen_image'] == pair['rejected_image'] == image
      chosen = pairs_lib.completion_of(record) if b is None else graph.completion_text(b)
      assert pair['chosen_completion'] == chosen
      assert pair['rejected_completion'] in [graph.completion_text(c) for c in top]
      assert pair['rejected_decision'] != graph.decision_id(graph.decide(scene))
    rerendered += b is not None
  assert 0 < rerendered < len(source)
  # A table made on the records' own scenes does not fit the re-rendered ones.
  own = _select(setup, tmp_path / 'own.npz', source=source)
  mixed = thinking_pairs.plan_for(
    source, graph, target='balanced', select='reference', selection=own
  )
  with pytest.raises(ValueError, match='made for another scene'):
    for m in range(len(source)):
      mixed.pair(source[m], m, graph, source, np.random.default_rng(0))


def _run_data(tmp_path, **data):
  cfg = config_defaults.base_config('', domain='driving', data='synth_drive')
  cfg.data.num_examples = dict(train=16, test=8, ood=8)
  cfg.data.spurious_correlation = 0.9
  cfg.cpo.batch_size, cfg.cpo.num_steps = 8, 2
  cfg.data.update(thinking_target='balanced', thinking_fraction=1.0, thinking_candidates=K, **data)
  return cfg, streams.RunData(cfg, str(tmp_path))


def test_the_run_selects_on_its_balanced_scenes_and_its_arms_show_the_same_ones(setup, tmp_path):
  # cpo_plus_selected, cpo_plus and dpo_random on one seed: the same chosen rows, each with
  # its own rejected side (the reference's pick, a random rewrite, another record's chain).
  _, _, graph, model, mesh = setup
  cfg, data = _run_data(tmp_path, thinking_select='reference')
  table = selection_lib.for_run(model, cfg, data, mesh=mesh, workdir=str(tmp_path / 'sel'))
  selected = next(data.cpo_batches(selection=table))
  plain = next(_run_data(tmp_path)[1].cpo_batches())
  random_negatives = next(_run_data(tmp_path, thinking_negative='random')[1].cpo_batches())
  for other in (plain, random_negatives):
    for key in ('chosen_input_ids', 'chosen_pixel_values', 'chosen_decision', 'index'):
      np.testing.assert_array_equal(selected[key], other[key])
  assert not np.array_equal(selected['rejected_input_ids'], plain['rejected_input_ids'])
  for index, rejected in zip(selected['index'], selected['rejected_decision']):
    picked = table.chosen[int(index)]
    assert rejected in [
      graph.decision_id(graph.decide(graph.assignment_from_ids(c))) for c in picked
    ]
  cfg.data.thinking_target = 'shortcut'  # a clear error before any scoring
  with pytest.raises(ValueError, match='both choose'):
    selection_lib.for_run(model, cfg, data, mesh=mesh, workdir=str(tmp_path / 'other'))
