"""The ablation harness (cpo_jax/ablate.py): its statistics on fixed inputs, the metrics it reads
from a report, the random-negative pairs and the compute-matched control it needs, and its
bookkeeping end to end (arms share their seed's SFT model; a rerun reuses everything)."""

import json
import math
import os

from cli_configs import SMALL_RUN
from cli_configs import cli_config
import numpy as np
import pytest
from scipy import stats

from cpo_jax import ablate
from cpo_jax import ablation_arms
from cpo_jax import ablation_report
from cpo_jax import ablation_stats
from cpo_jax import main
from cpo_jax.data import datasets
from cpo_jax.data import pairs as pairs_lib
from cpo_jax.data import processors
from cpo_jax.data import sources
from cpo_jax.data import streams
from cpo_jax.knowledge import load_graph
from cpo_jax.train import pair_images

ACCURACIES = [0.70, 0.72, 0.75, 0.71, 0.74]


def test_t_interval_matches_scipy_and_the_t_table():
  got = ablation_stats.t_interval(ACCURACIES)
  ci = stats.ttest_1samp(ACCURACIES, 0.0).confidence_interval(0.95)
  assert got.n == 5 and got.mean == pytest.approx(0.724)
  assert (got.low, got.high) == pytest.approx((ci.low, ci.high), rel=1e-12)
  # By hand: s = sqrt(0.00172 / 4), t(0.975, 4) = 2.776445 (a t table).
  half = 2.776445 * math.sqrt(0.00172 / 4) / math.sqrt(5)
  assert (got.low, got.high) == pytest.approx((0.724 - half, 0.724 + half), abs=1e-6)
  # Unmeasured values are left out; one value has no interval, none has no mean.
  assert ablation_stats.t_interval([0.5, None, math.nan, 0.7]).n == 2
  one = ablation_stats.t_interval([0.5, None])
  assert one.mean == 0.5 and math.isnan(one.low) and one.as_dict()['low'] is None
  assert ablation_stats.t_interval([]).as_dict() == dict(mean=None, low=None, high=None, n=0)


def test_paired_comparison_is_the_t_interval_of_per_seed_differences():
  arm = {0: 0.80, 1: 0.70, 2: 0.90, 3: 0.75}
  sft = {0: 0.70, 1: 0.70, 2: 0.80, 3: None}  # seed 3 unmeasured for the reference: unpaired
  values = {'sft': {'ood_accuracy': sft}, 'cpo_plus': {'ood_accuracy': arm}}
  table = ablation_stats.summarize(values, 'sft')
  paired = table['cpo_plus']['ood_accuracy']['paired']
  ci = stats.ttest_rel([0.80, 0.70, 0.90], [0.70, 0.70, 0.80]).confidence_interval(0.95)
  assert paired['n'] == 3 and paired['mean'] == pytest.approx(0.2 / 3)
  assert (paired['low'], paired['high']) == pytest.approx((ci.low, ci.high), rel=1e-12)
  assert table['cpo_plus']['ood_accuracy']['n'] == 4  # the arm's own mean uses all its seeds
  assert table['sft']['ood_accuracy']['paired'] is None
  assert ablation_stats.summarize(values, None)['cpo_plus']['ood_accuracy']['paired'] is None
  # Arm against arm: the same paired statistic, pairs with an arm not run left out.
  comparisons = ablation_stats.compare(values, [('cpo_plus', 'sft'), ('cpo_plus', 'dpo_random')])
  assert list(comparisons) == ['cpo_plus - sft']
  assert comparisons['cpo_plus - sft']['ood_accuracy'] == paired


def test_compare_items_name_two_known_arms():
  assert ablate.parse_compare(['cpo_plus:dpo_random'], ablation_arms.ARMS) == [
    ('cpo_plus', 'dpo_random')
  ]
  for bad in ('cpo_plus', 'cpo_plus:nope', 'sft:sft'):
    with pytest.raises(Exception, match='--compare item'):
      ablate.parse_compare([bad], ablation_arms.ARMS)


def test_run_metrics_from_a_report_and_its_training_log():
  report = {
    'splits': {
      'test': {'accuracy': 0.9, 'n': 200, 'unparsed': 0},
      'ood': {'accuracy': 0.6, 'n': 200, 'unparsed': 10},
    },
    'drift': {'outcome_shift': 0.3, 'counterfactual_follow': 0.8},
    'concept_readout': {'misread': 0.25},
    'interference': {
      'none': {'0': 0.9},
      'occlude': {'0.5': 0.7, '1.0': 0.3},  # (0.9+0.7)/2*0.5 + (0.7+0.3)/2*0.5 = 0.65
      'noise': {'0.3': 0.9, '0.1': 0.9},  # 0.9 over [0, 0.3]
      'synonym': {'1': 0.6, '2': 0.4},  # 0.5 over [1, 2]
      'contradict': {'1': 0.2},  # one point: its accuracy
    },
  }
  rows = [
    {'stage': 'cpo_plus', 'step': 20, 'rewards/chosen': -0.05},
    {'stage': 'cpo_plus', 'step': 10, 'rewards/chosen': 0.01},
    {'stage': 'sft', 'step': 30, 'loss': 1.0},
  ]
  got = ablation_report.run_metrics(report, rows, beta=0.1)
  assert got == pytest.approx(
    dict(
      test_accuracy=0.9,
      ood_accuracy=0.6,
      test_unparsed=0.0,
      ood_unparsed=0.05,
      counterfactual_follow=0.8,
      outcome_shift=0.3,
      concept_misread=0.25,
      perception_interference_area=(0.65 + 0.9) / 2,
      thinking_interference_area=(0.5 + 0.2) / 2,
      chosen_logp_change=-0.5,  # the last logged step's rewards/chosen / beta
    )
  )
  bare = ablation_report.run_metrics({'splits': report['splits']}, [], beta=0.1)
  assert math.isnan(bare['chosen_logp_change']) and math.isnan(bare['outcome_shift'])
  assert math.isnan(bare['concept_misread'])
  assert math.isnan(ablation_report.curve_area({'1': 0.5, '2': None}))


@pytest.fixture(scope='module')
def proc(tmp_path_factory):
  return processors.make_processors(str(tmp_path_factory.mktemp('tok')))


@pytest.fixture(scope='module')
def train():
  return sources.make_source('synth_drive', 'train', num_examples=64, seed=0)


def test_random_negative_pairs_take_another_records_chain_for_the_same_image(proc, train):
  g = load_graph('driving')
  index = pairs_lib.PairIndex.from_source(train)
  rng = np.random.default_rng(0)
  same_decision = 0
  for i in range(24):
    rec = train[i]
    pair = pairs_lib.make_pair(
      rec, i, rng, graph=g, source=train, index=index, thinking_fraction=1.0,
      thinking_negative='random',
    )  # fmt: skip
    j = pair['rejected_index']
    assert j != i and pair['source'] == pairs_lib.SOURCE_IDS['thinking']
    assert pair['rejected_completion'] == pairs_lib.completion_of(train[j])
    assert pair['rejected_completion'] != pair['chosen_completion']
    assert pair['rejected_decision'] == train[j]['decision']
    assert pair['rejected_image'] is pair['chosen_image'] and pair['sample_weight'] == 1.0
    same_decision += pair['rejected_decision'] == pair['chosen_decision']
  assert same_decision < 24  # not targeted, but not one decision either
  with pytest.raises(ValueError, match='thinking_negative'):
    pairs_lib.make_pair(rec, 0, rng, graph=g, source=train, index=index, thinking_negative='x')

  # In the grouped stream: every pair of every batch is one, and the step's layout check holds.
  it = datasets.make_cpo_iterator(
    train, proc, batch_size=8, max_len=96, seed=0, thinking_fraction=1.0,
    thinking_negative='random', pair_layout=(1, 1),
  )  # fmt: skip
  for _ in range(2):
    b = next(it)
    assert b['source'].tolist() == [0] * 8 and b['sample_weight'].tolist() == [1.0] * 8
    pair_images.check_pair_layout(b, (1, 1))  # the rejected image is the chosen one
    assert all(
      not np.array_equal(c, r) for c, r in zip(b['chosen_input_ids'], b['rejected_input_ids'])
    )


@pytest.mark.parametrize('fraction,layout,source', [(0.0, (0, 1), 1), (1.0, (1, 1), 0)])
def test_one_pair_source_only_with_the_grouped_layout(proc, train, fraction, layout, source):
  assert datasets.pair_layout_for(fraction, 8) == layout
  b = next(
    datasets.make_cpo_iterator(
      train, proc, batch_size=8, max_len=96, seed=0, thinking_fraction=fraction, pair_layout=layout
    )
  )
  assert b['source'].tolist() == [source] * 8
  pair_images.check_pair_layout(b, layout)


def _micro(*overrides):
  return cli_config(
    'configs/driving.py',
    *SMALL_RUN,
    '--config.eval.max_examples=8',
    '--config.eval.robustness=false',
    *overrides,
  )


def _rows(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def _never(cfg, workdir):
  raise AssertionError(f'{workdir} should have been reused')


def test_arms_share_their_seed_sft_model_and_a_rerun_reuses_everything(tmp_path):
  cfg, workdir, arms = _micro(), str(tmp_path), ['sft_more', 'dpo_random']
  result = ablate.ablate(cfg, [0], arms, workdir)
  assert [(r['run'], r['status']) for r in result['runs']] == [
    ('sft_model', 'ran'),
    ('sft_more', 'ran'),
    ('dpo_random', 'ran'),
  ]
  seed = tmp_path / 'seed_0'
  sft_dir = str(seed / 'sft_model')
  # SFT trained once, in the seed's shared run; each arm starts from it and trains no SFT.
  assert [(r['stage'], r['step']) for r in _rows(sft_dir)] == [('sft', s) for s in (1, 2, 3, 4)]
  for arm in arms:
    assert not (seed / arm / 'checkpoints' / 'sft').exists()
    assert json.load(open(seed / arm / 'config.json'))['sft']['from_workdir'] == sft_dir
  # The compute-matched control: the CPO++ stage's steps, rows per step and learning rates.
  more, dpo = _rows(str(seed / 'sft_more')), _rows(str(seed / 'dpo_random'))
  assert [(r['stage'], r['step']) for r in more] == [('sft_more', 1), ('sft_more', 2)]
  assert [(r['stage'], r['step']) for r in dpo] == [('cpo_plus', 1), ('cpo_plus', 2)]
  assert [r['lr'] for r in more] == [r['lr'] for r in dpo]
  arm_cfg = ablate.plan_runs(cfg, [0], ['sft_more'], workdir)[1].cfg
  data = streams.RunData(arm_cfg, str(seed / 'sft_more'))
  rows = next(data.sft_more_batches())['index']
  arm_cfg.data.thinking_fraction = 1.0  # one stream: the CPO++ pairs' records, in its order
  assert rows.tolist() == next(streams.RunData(arm_cfg, workdir).cpo_batches())['index'].tolist()
  assert len(rows) == cfg.cpo.batch_size
  # An SFT model trained on other records (another shortcut strength) is not that model.
  arm_cfg.data.spurious_correlation = 0.5
  with pytest.raises(ValueError, match='data.spurious_correlation: 0.9 there, 0.5 here'):
    main.check_sft_source(arm_cfg, ['cpo_plus', 'eval'])
  # DPO with random negatives: every pair a random negative (logged as the text side).
  assert all(r['thinking/count'] == cfg.cpo.batch_size for r in dpo)
  assert 'baseline' not in json.load(open(seed / 'dpo_random' / 'eval' / 'report.json'))

  # The table over the finished runs.
  record = json.load(open(tmp_path / 'ablation.json'))
  assert record['arms'] == arms and record['seeds'] == [0]
  for arm in arms:
    assert 0.0 <= record['values'][arm]['ood_accuracy']['0'] <= 1.0
  assert record['values']['sft_more']['chosen_logp_change']['0'] is None
  assert math.isfinite(record['values']['dpo_random']['chosen_logp_change']['0'])
  assert '`ood_accuracy`' in (tmp_path / 'ablation.md').read_text()
  assert (tmp_path / 'ablation.png').stat().st_size > 0

  # A second invocation trains and evaluates nothing; it adds the asked arm-to-arm comparison.
  again = ablate.ablate(
    cfg, [0], arms, workdir, compare=[('dpo_random', 'sft_more')], run_fn=_never
  )
  assert [r['status'] for r in again['runs']] == ['reused'] * 3
  assert json.dumps(again['summary']) == json.dumps(result['summary'])
  diff = json.load(open(tmp_path / 'ablation.json'))['comparisons']['dpo_random - sft_more']
  values = record['values']
  want = values['dpo_random']['ood_accuracy']['0'] - values['sft_more']['ood_accuracy']['0']
  assert diff['ood_accuracy']['mean'] == pytest.approx(want) and diff['ood_accuracy']['n'] == 1
  assert '`dpo_random - sft_more`' in (tmp_path / 'ablation.md').read_text()
  assert _rows(str(seed / 'dpo_random')) == dpo
  # A half-finished arm (no report yet) is resumed by main.run from its checkpoints (tested in
  # test_main), not counted as finished.
  os.remove(seed / 'dpo_random' / 'eval' / 'report.json')
  runs = ablate.plan_runs(cfg, [0], arms, workdir)
  assert [ablate.run_state(r) for r in runs] == ['done', 'done', 'partial']
  # A run directory written with another config is never mixed in.
  with pytest.raises(ValueError, match='cpo.num_steps: 2 there, 3 now'):
    ablate.ablate(_micro('--config.cpo.num_steps=3'), [0], arms, workdir, run_fn=_never)


def test_a_run_from_another_workdirs_sft_model_checks_it_is_that_model(tmp_path):
  sft_dir = str(tmp_path / 'sft')
  cfg = _micro('--config.stages=cpo_plus,eval', f'--config.sft.from_workdir={sft_dir}')
  with pytest.raises(FileNotFoundError, match='reach step 0 of sft.num_steps=4'):
    main.run(cfg, str(tmp_path / 'arm'))
  cfg.stages = 'sft,cpo_plus,eval'
  with pytest.raises(ValueError, match="drop sft from config.stages"):
    main.check_sft_source(cfg, main.parse_stages(cfg.stages))
  with pytest.raises(ValueError, match="both 'sft_more' and 'cpo_plus'"):
    main.parse_stages('sft,sft_more,cpo_plus')
