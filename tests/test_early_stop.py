"""sft.early_stop='val_loss': the SFT stage measures its loss on held-out train scenes, keeps
the params of the lowest one, stops after `patience` measurements without a lower one, and
hands those params on (to CPO++ and to the ablation arms that restore the SFT model)."""

import json

from cli_configs import SMALL_RUN
from cli_configs import cli_config
from flax import nnx
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cpo_jax import ablate
from cpo_jax import main
from cpo_jax.train import early_stop
from cpo_jax.train import loop


def test_the_best_step_is_the_first_lowest_loss_and_patience_counts_since_it():
  t = early_stop.Tracker(patience=2)
  improved = [t.record(s, v) for s, v in ((2, 3.0), (4, 2.0), (6, 2.5), (8, 2.0))]
  assert improved == [True, True, False, False]  # equal is not lower
  assert (t.best_step, t.best_loss, t.stalled, t.should_stop) == (4, 2.0, 2, True)
  never = early_stop.Tracker(patience=0, history=list(t.history))
  assert never.stalled == 2 and not never.should_stop
  with pytest.raises(ValueError, match='at step 8 after step 8'):
    t.record(8, 1.0)
  with pytest.raises(FloatingPointError, match='step 10 is nan'):
    t.record(10, float('nan'))
  with pytest.raises(ValueError, match='sft.val_every_steps=0'):
    early_stop.Validation(every=0, patience=1, batches=list)


SCRIPT = [3.0, 2.0, 2.5, 2.6]  # measured at steps 2, 4, 6, 8: best 4, two worse, stop at 8


def _config(workdir):
  return cli_config(
    'configs/medical.py',
    f'--workdir={workdir}',
    *SMALL_RUN,  # batches of 8, checkpoints every 2 steps
    '--config.stages=sft',
    '--config.sft.num_steps=12',
    '--config.sft.early_stop=val_loss',
    '--config.sft.val_every_steps=2',
    '--config.sft.patience=2',
    '--config.sft.val_examples=8',
  )


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """An SFT run whose held-out losses (measured for real) are replaced by SCRIPT."""
  workdir = tmp_path_factory.mktemp('early')
  script, measured = iter(SCRIPT), []
  real = early_stop.held_out_loss

  def scripted(*args, **kw):
    measured.append(real(*args, **kw))
    return next(script)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(early_stop, 'held_out_loss', scripted)
    main.run(_config(workdir), str(workdir))
  return workdir, measured


def _rows(workdir):
  return [json.loads(line) for line in open(workdir / 'metrics.jsonl')]


def _params(tree):
  """{key path: array}; a saved nnx Variable's trailing 'value' key dropped."""
  value = jax.tree_util.DictKey('value')
  return {
    k[:-1] if k[-1] == value else k: np.asarray(v)
    for k, v in jax.tree_util.tree_leaves_with_path(tree)
  }


def test_the_stage_stops_after_patience_and_keeps_the_best_steps_params(run):
  workdir, measured = run
  assert len(measured) == 4 and all(np.isfinite(m) and m > 0 for m in measured)
  rows = _rows(workdir)
  val = [(r['step'], r['val/loss'], r['val/best_step']) for r in rows if 'val/loss' in r]
  assert val == [(2, 3.0, 2), (4, 2.0, 4), (6, 2.5, 4), (8, 2.6, 4)]
  assert max(r['step'] for r in rows if r['stage'] == 'sft') == 8  # not sft.num_steps=12
  record = early_stop.read_record(str(workdir), 'sft')
  assert (record['best_step'], record['stopped_at']) == (4, 8)
  assert loop.latest_step(str(workdir), 'sft') == 8
  assert loop.stage_finished(str(workdir), 'sft', 12)
  assert [p.name for p in (workdir / 'checkpoints' / 'sft_val_best').iterdir()] == ['4']

  # What the next stage starts from (an ablation arm restores the SFT model the same way):
  # the params of step 4, not of the last step trained.
  model, _ = main.restore_latest(_config(workdir), str(workdir))
  got = _params(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  read = lambda path: _params(ocp.StandardCheckpointer().restore(path))
  best = read(workdir / 'checkpoints' / 'sft_val_best' / '4' / 'default')
  last = read(workdir / 'checkpoints' / 'sft' / '8' / 'params')
  assert got.keys() == best.keys()
  for key, value in got.items():
    np.testing.assert_array_equal(value, best[key], err_msg=str(key))
  assert any(not np.array_equal(v, last[k]) for k, v in got.items())


def test_a_rerun_of_a_stopped_stage_trains_nothing(run):
  workdir, _ = run
  before = _rows(workdir)
  main.run(_config(workdir), str(workdir))
  assert _rows(workdir) == before


def test_ablation_arms_of_the_switches(tmp_path):
  cfg = cli_config('configs/medical.py', *SMALL_RUN)
  arms = ['sft', 'cpo_plus_fresh', 'sft_more_fresh', 'sft_early', 'cpo_plus_early']
  runs = ablate.plan_runs(cfg, [0], arms, str(tmp_path))
  seed = tmp_path / 'seed_0'
  assert [(r.name, r.workdir) for r in runs[:2]] == [
    ('sft_model', str(seed / 'sft_model')),
    ('sft_model_early', str(seed / 'sft_model_early')),
  ]
  by_name = {r.name: r.cfg for r in runs}
  assert by_name['sft_model'].sft.early_stop == '' and by_name['sft_model_early'].sft.early_stop
  for arm in arms:
    c = by_name[arm]
    early = arm.endswith('_early')
    assert c.sft.from_workdir == str(seed / ('sft_model_early' if early else 'sft_model'))
    assert c.sft.early_stop == ('val_loss' if early else '')  # the SFT model it restores
    # The embedded default makes its pairs on fresh scenes; cpo_plus_early is the script's recipe.
    assert c.data.cpo_scenes == ('sft' if arm == 'cpo_plus_early' else 'fresh')
  assert by_name['sft_more_fresh'].stages == 'sft_more,eval'
