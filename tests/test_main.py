"""The CLI contract (DESIGN.md): stages, workdir layout, report fields, resume, --mode=eval."""

import json
import os

from cli_configs import SMALL_RUN
from cli_configs import cli_config
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tbparse import SummaryReader

from cpo_jax import main
from cpo_jax import models
from cpo_jax import plan
from cpo_jax import sharding
from cpo_jax.evaluate import report as report_lib


def _config(workdir, *overrides):
  return cli_config('configs/driving.py', f'--workdir={workdir}', *SMALL_RUN, *overrides)


def _rows(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]


def test_default_stages_write_the_contract_files_and_resume(tmp_path):
  workdir = str(tmp_path)
  report = main.run(_config(workdir), workdir)
  rows = _rows(workdir)
  assert [(r['stage'], r['step']) for r in rows] == (
    [('sft', s) for s in (1, 2, 3, 4)] + [('cpo_plus', s) for s in (1, 2)]
  )
  assert all('loss' in r for r in rows)
  cpo = rows[-1]
  for key in ('rewards/accuracies', 'rewards/margins', 'rewards/chosen', 'rewards/rejected'):
    assert key in cpo
  assert any(k.startswith(('thinking/', 'perception/')) for k in cpo)

  on_disk = json.load(open(tmp_path / 'eval' / 'report.json'))
  assert on_disk == json.loads(json.dumps(report))
  for split in ('test', 'ood'):
    assert on_disk['splits'][split]['n'] == 8
    assert 0.0 <= on_disk['splits'][split]['accuracy'] <= 1.0
    assert on_disk['baseline']['splits'][split]['n'] == 8  # the SFT model, same examples.
  for kind in ('occlude', 'noise', 'image_swap', 'synonym'):
    assert all(0.0 <= acc <= 1.0 for acc in on_disk['interference'][kind].values())
  assert 0.0 <= on_disk['drift']['outcome_shift'] <= 1.0
  assert 'outcome_shift' in on_disk['baseline']['drift']
  assert (tmp_path / 'eval' / 'robustness.png').stat().st_size > 0
  assert (tmp_path / 'eval' / 'accuracy.png').stat().st_size > 0
  assert (tmp_path / 'eval' / 'training_curves.png').stat().st_size > 0
  # TensorBoard holds the same losses as metrics.jsonl, per stage and step.
  scalars = SummaryReader(str(tmp_path / 'tensorboard')).scalars
  logged = {(r['stage'], r['step']): r['loss'] for r in rows}
  events = {
    tuple(t.split('/')[:1]) + (int(s),): v
    for t, s, v in zip(scalars['tag'], scalars['step'], scalars['value'])
    if t.endswith('/loss') and t.count('/') == 1
  }
  assert events.keys() == logged.keys()
  for key, loss in logged.items():
    np.testing.assert_allclose(events[key], loss, rtol=1e-6, err_msg=str(key))
  for stage in ('sft', 'cpo_plus'):
    assert os.listdir(tmp_path / 'checkpoints' / stage)

  # The same command again resumes: nothing is retrained, the report is the same model's.
  again = main.run(_config(workdir), workdir)
  assert len(_rows(workdir)) == len(rows)
  assert main.summary(again) == main.summary(report)
  # --mode=eval evaluates the latest checkpoints.
  evaluated = main.run(_config(workdir), workdir, mode='eval')
  assert main.summary(evaluated) == main.summary(report)
  # --mode=export writes a Hugging Face directory (adapters merged) with its tokenizer.
  export_dir = tmp_path / 'hf'
  main.export(_config(workdir), workdir, str(export_dir))
  for name in ('config.json', 'model.safetensors', 'tokenizer.json', 'preprocessor_config.json'):
    assert (export_dir / name).exists(), name
  model, _ = main.restore_latest(_config(workdir), workdir)
  exported = models.load_hf(str(export_dir))
  ids = np.array([[3, 4, 5, 6]])
  np.testing.assert_allclose(exported(ids), model(ids), atol=1e-5)


def test_eval_during_training_logs_and_keeps_the_best_step(tmp_path, monkeypatch):
  # The real evaluator runs; its accuracies (all 0 after so few steps) are replaced by a script
  # so that the best step is neither the first nor the last.
  script = iter([0.25, 0.75, 0.5, 0.1])
  real = report_lib.during_training

  def scripted(cfg, data):
    evaluate = real(cfg, data)
    return lambda model: dict(evaluate(model), **{'eval/test/accuracy': next(script)})

  monkeypatch.setattr(report_lib, 'during_training', scripted)
  cfg = _config(
    tmp_path,
    '--config.eval.every_steps=2',
    '--config.eval.every_steps_examples=8',
    '--config.sft.num_steps=6',
    '--config.stages=sft,cpo_plus',
  )
  main.run(cfg, str(tmp_path))
  evals = [r for r in _rows(tmp_path) if 'eval/test/accuracy' in r]
  assert [(r['stage'], r['step']) for r in evals] == [
    ('sft', 2),
    ('sft', 4),
    ('sft', 6),
    ('cpo_plus', 2),
  ]
  assert all(0 <= r['eval/test/unparsed'] <= 8 for r in evals)  # on the first 8 examples
  kept = lambda stage: [int(p.name) for p in (tmp_path / 'checkpoints' / f'{stage}_best').iterdir()]
  assert kept('sft') == [4] and kept('cpo_plus') == [2]


def test_plan_compiles_the_step_for_a_mesh_without_allocating():
  cfg = _config(
    'unused',
    '--config.mesh.shape.fsdp=2',
    '--config.mesh.shape.tensor=2',
    '--config.data.thinking_fraction=0.5',
  )
  summary = plan.plan(cfg, 'cpo_plus')
  assert summary['mesh'] == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert summary['bytes_per_device'] >= summary['temp_bytes_per_device'] > 0
  assert 0 < summary['trainable_bytes_total'] < summary['param_bytes_total']  # LoRA only.
  # 8 pairs, half thinking (grouped): 8 chosen + 4 perception rejected images, encoded
  # once for policy and reference.
  assert summary['work_per_step'] == {
    'policy_sequences': 16,
    'reference_sequences': 16,
    'images_encoded': 12,
  }


def test_plan_counts_device_made_pairs_and_a_precomputed_reference():
  cfg = _config(
    'unused',
    '--config.cpo.device_perturbations=occlude:1.0,noise:0.5',
    '--config.cpo.reference=precomputed',
    '--config.cpo.answer_weight=0.5',  # the batch also carries each side's answer start
    '--config.data.thinking_fraction=0.5',
  )
  summary = plan.plan(cfg, 'cpo_plus')
  # + 2 perturbed rejected sides per pair; no reference forward at all.
  assert summary['work_per_step'] == {
    'policy_sequences': 32,
    'reference_sequences': 0,
    'images_encoded': 12 + 16,
  }


def test_unknown_stage_is_a_clear_error():
  with pytest.raises(ValueError, match=r"unknown stage\(s\) \['dpo'\]"):
    main.parse_stages('sft,dpo')


@pytest.mark.parametrize('mode', ['eval', 'export'])
def test_eval_or_export_without_a_checkpoint_is_a_clear_error(tmp_path, mode):
  workdir = str(tmp_path / 'mistyped')
  cfg = _config(workdir)
  with pytest.raises(FileNotFoundError, match='no sft checkpoint under .*mistyped'):
    if mode == 'eval':
      main.run(cfg, workdir, mode='eval')
    else:
      main.export(cfg, workdir, str(tmp_path / 'hf'))
  assert not (tmp_path / 'hf').exists() and not (tmp_path / 'mistyped').exists()


def test_init_from_is_read_into_the_mesh_shardings_in_param_dtype(tmp_path):

  source = models.Qwen2_5_VL(models.get_config('tiny'), rngs=nnx.Rngs(0))
  models.save_hf(source, str(tmp_path / 'hf'))
  cfg = _config(
    str(tmp_path),
    f'--config.model.init_from={tmp_path / "hf"}',
    '--config.model.param_dtype=bfloat16',
    '--config.mesh.shape.fsdp=4',
  )
  mesh = sharding.make_mesh(cfg.mesh.shape)
  model = main.build_model(cfg, None, mesh)
  kernel = model.layers.gate_proj.kernel[...]
  assert kernel.dtype == jnp.bfloat16 and model.dtype == jnp.float32
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', None)
  assert all(s.data.shape[1] == kernel.shape[1] // 4 for s in kernel.addressable_shards)
  np.testing.assert_array_equal(
    np.asarray(kernel, np.float32),
    np.asarray(source.layers.gate_proj.kernel[...].astype(jnp.bfloat16), np.float32),
  )


def test_plan_reads_only_the_config_of_init_from_and_says_which_tpus_fit(tmp_path):
  models.save_hf(models.Qwen2_5_VL(models.get_config('tiny'), rngs=nnx.Rngs(0)), str(tmp_path))
  os.remove(tmp_path / 'model.safetensors')  # the weights are never read
  cfg = _config('unused', f'--config.model.init_from={tmp_path}', '--config.mesh.shape.fsdp=2')
  summary = plan.plan(cfg, 'sft')
  assert summary['preset'] == f'init_from:{tmp_path}'
  assert summary['fits_tpu'] == ['v4', 'v5e', 'v5p', 'v6e']  # a tiny model fits every chip
  assert summary['param_bytes_total'] > 0


def test_plan_with_remat_holds_less_scratch_memory():
  temp = {}
  for mode in ('none', 'full'):
    cfg = _config('unused', f'--config.model.remat={mode}', '--config.data.max_len=256')
    temp[mode] = plan.plan(cfg, 'sft')['temp_bytes_per_device']
  assert temp['full'] < 0.8 * temp['none'], temp


def test_plan_with_accumulation_compiles_micro_batches():
  cfg = _config('unused', '--config.cpo.grad_accum_steps=2', '--config.cpo.batch_size=16')
  summary = plan.plan(cfg, 'cpo_plus')
  assert summary['grad_accum_steps'] == 2
  assert summary['batch']['chosen_input_ids'] == [2, 8, 96]  # 16 pairs as 2 micro-batches of 8
  # 8 pairs as 2 micro-batches of 4 cannot split over 8 data-parallel devices: said so.
  cfg = _config('unused', '--config.cpo.grad_accum_steps=2')
  with pytest.raises(ValueError, match='must be a multiple of 8'):
    plan.plan(cfg, 'cpo_plus')
