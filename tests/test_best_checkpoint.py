"""eval.checkpoint='best': --mode=eval evaluates the params of the best evaluated step
(checkpoints/<stage>_best/) and its report names that checkpoint; without one, eval, export and
training stop with a clear error."""

import json
import shutil

from cli_configs import SMALL_RUN
from cli_configs import cli_config
from flax import nnx
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cpo_jax import main
from cpo_jax.evaluate import report as report_lib


def _config(workdir, *overrides):
  return cli_config(
    'configs/driving.py',
    f'--workdir={workdir}',
    *SMALL_RUN,
    '--config.stages=sft',
    '--config.sft.num_steps=2',
    '--config.checkpoint.every_steps=1',  # the last 2 are kept: sft/1 and sft/2
    '--config.eval.every_steps=1',
    '--config.eval.every_steps_examples=8',
    '--config.eval.splits=test',
    '--config.eval.robustness=False',
    *overrides,
  )


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A 2-step SFT run evaluated at steps 1 and 2, whose best step is 1 (not the last)."""
  workdir = tmp_path_factory.mktemp('run')
  # The real evaluator runs; its accuracies (all 0 after so few steps) are replaced by a script.
  script = iter([0.75, 0.25])
  real = report_lib.during_training

  def scripted(cfg, data):
    evaluate = real(cfg, data)
    return lambda model: dict(evaluate(model), **{'eval/test/accuracy': next(script)})

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(report_lib, 'during_training', scripted)
    main.run(_config(workdir), str(workdir))
  assert sorted(p.name for p in (workdir / 'checkpoints' / 'sft_best').iterdir()) == ['1']
  return workdir


def _logged_unparsed(workdir, step):
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  (row,) = [r for r in rows if r['step'] == step and 'eval/test/unparsed' in r]
  return row['eval/test/unparsed']


def _by_name(tree):
  """{('layers', 'q_proj', 'kernel'): array} (a saved Variable's trailing 'value' dropped)."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    names = tuple(p.key for p in path)
    out[names[:-1] if names[-1] == 'value' else names] = np.asarray(leaf)
  return out


def _saved_params(workdir, step):
  """The trained params of checkpoints/sft/<step>, read by Orbax alone."""
  path = workdir / 'checkpoints' / 'sft' / str(step) / 'params'
  return _by_name(ocp.StandardCheckpointer().restore(path))


def _model_params(model):
  return _by_name(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_eval_of_best_evaluates_the_best_steps_params_and_names_it(workdir, monkeypatch):
  evaluated = []  # the model --mode=eval measures (the real evaluation runs)
  real = report_lib.run_eval
  monkeypatch.setattr(
    report_lib, 'run_eval', lambda m, *a, **k: evaluated.append(m) or real(m, *a, **k)
  )
  best = _config(workdir, '--config.eval.checkpoint=best')
  report = main.run(best, str(workdir), mode='eval')

  params, at_1, at_2 = (
    _model_params(evaluated[0]),
    _saved_params(workdir, 1),
    _saved_params(workdir, 2),
  )
  assert params.keys() == at_1.keys()
  for key, value in params.items():
    np.testing.assert_array_equal(value, at_1[key], err_msg=str(key))
  assert any(not np.array_equal(v, at_2[k]) for k, v in params.items())  # not the last step's
  expected = {
    'stage': 'sft',
    'step': 1,
    'checkpoint': 'best',
    'metrics': {'eval/test/accuracy': 0.75, 'eval/test/unparsed': _logged_unparsed(workdir, 1)},
  }
  assert report['checkpoint'] == expected
  assert json.load(open(workdir / 'eval' / 'report.json'))['checkpoint'] == expected
  assert main.summary(report)['checkpoint'] == expected
  # 'last' (the default) names the final step and what was logged for it.
  assert main.used_checkpoint(_config(workdir), str(workdir), 'sft') == {
    'stage': 'sft',
    'step': 2,
    'checkpoint': 'last',
    'metrics': {'eval/test/accuracy': 0.25, 'eval/test/unparsed': _logged_unparsed(workdir, 2)},
  }


def test_best_without_a_best_checkpoint_is_a_clear_error(workdir, tmp_path):
  # The same run's checkpoints without checkpoints/sft_best/ (as if trained without
  # eval.every_steps).
  shutil.copytree(workdir / 'checkpoints' / 'sft', tmp_path / 'checkpoints' / 'sft')
  best = _config(tmp_path, '--config.eval.checkpoint=best')
  missing = str(tmp_path / 'checkpoints' / 'sft_best')
  with pytest.raises(FileNotFoundError, match=f'no best checkpoint .* under {missing}'):
    main.run(best, str(tmp_path), mode='eval')
  with pytest.raises(FileNotFoundError, match=f'under {missing}'):
    main.export(best, str(tmp_path), str(tmp_path / 'hf'))
  assert not (tmp_path / 'hf').exists()
  # Training that would keep no best checkpoint stops before it starts.
  no_eval = _config(tmp_path, '--config.eval.checkpoint=best', '--config.eval.every_steps=0')
  no_eval.stages = 'sft,eval'
  with pytest.raises(ValueError, match='eval.every_steps > 0'):
    main.run(no_eval, str(tmp_path))
  with pytest.raises(ValueError, match="eval.checkpoint='worst'"):
    main.run(_config(tmp_path, '--config.eval.checkpoint=worst'), str(tmp_path), mode='eval')
