r"""cpo_jax command line: SFT -> CPO++ -> eval, from a laptop CPU to a TPU pod.

  python -m cpo_jax.main --config=configs/driving.py [--workdir=DIR]
  python -m cpo_jax.main --config=configs/driving.py --workdir=DIR --mode=eval

Modes: `train` runs the stages in `config.stages` (resuming from the workdir's checkpoints);
`eval` evaluates the latest checkpoints in the workdir; `export` writes them as a Hugging Face
directory (adapters merged) to --export_dir; `plan` compiles the train step for the configured
preset and mesh without allocating it and prints bytes per device as one JSON line; `inspect`
reads the configured data without training and writes <workdir>/inspect/ (inspect_data.py).
"""

import functools
import json

from absl import app
from absl import flags
from absl import logging
from flax import nnx
import jax
from ml_collections import config_flags

from cpo_jax import inspect_data
from cpo_jax import models
from cpo_jax import paths
from cpo_jax import plan as plan_lib
from cpo_jax import sharding
from cpo_jax.data import streams
from cpo_jax.evaluate import report as report_lib
from cpo_jax.train import counterfactual_selection
from cpo_jax.train import early_stop
from cpo_jax.train import loop
from cpo_jax.train import preemption
from cpo_jax.train import stages
from cpo_jax.train import wandb_writer
from cpo_jax.train import writers

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py[:arg]).')
_WORKDIR = flags.DEFINE_string('workdir', 'workdir', 'Where checkpoints, metrics and reports go.')
_MODE = flags.DEFINE_enum(
  'mode', 'train', ['train', 'eval', 'export', 'plan', 'inspect'], 'What to run.'
)
_EXPORT_DIR = flags.DEFINE_string('export_dir', None, 'Where --mode=export writes.')
_PLAN_STAGE = flags.DEFINE_enum(
  'plan_stage', 'cpo_plus', ['sft', 'cpo_plus'], 'Which train step --mode=plan compiles.'
)
_DISTRIBUTED = flags.DEFINE_bool(
  'distributed', False, 'Call jax.distributed.initialize() (multi-host TPU pods).'
)

STAGES = ('sft', 'sft_more', 'cpo_plus', 'eval')
# What an SFT model shared through sft.from_workdir must agree on (the rest may differ per arm;
# how the model computes, e.g. model.remat or model.dtype, does not change its weights).
SFT_SOURCE_KEYS = (
  'seed',
  'model.preset',
  'model.init_from',
  'model.param_dtype',
  'sft',
  'data.name',
  'data.num_examples',
  'data.image_size',
  'data.spurious_correlation',  # the synthetic train split's shortcut: other records
)


def parse_stages(spec):
  names = [s.strip() for s in spec.split(',') if s.strip()]
  unknown = [s for s in names if s not in STAGES]
  if unknown:
    raise ValueError(f'config.stages has unknown stage(s) {unknown}; known: {STAGES}.')
  if 'sft_more' in names and 'cpo_plus' in names:
    raise ValueError(
      "config.stages has both 'sft_more' and 'cpo_plus': each continues the SFT model on its "
      'own adapters; run them in separate workdirs (cpo_jax/ablate.py does).'
    )
  return names


def check_sft_source(cfg, wanted):
  """With sft.from_workdir: that workdir holds a finished SFT stage of the same model and data
  (its config.json), and this run does not train SFT itself."""
  source = cfg.sft.from_workdir
  if 'sft' in wanted:
    raise ValueError(
      f"config.stages has 'sft' but sft.from_workdir={source!r} restores the SFT model from "
      'there; drop sft from config.stages.'
    )
  step = loop.latest_step(source, 'sft')
  if not loop.stage_finished(source, 'sft', cfg.sft.num_steps):
    raise FileNotFoundError(
      f'sft.from_workdir={source!r}: its SFT checkpoints reach step {step or 0} of '
      f'sft.num_steps={cfg.sft.num_steps}; finish that run first (--config.stages=sft there).'
    )
  config_file = paths.path(source) / 'config.json'
  theirs, ours = json.loads(config_file.read_text()), json.loads(cfg.to_json_best_effort())
  for c in (theirs, ours):
    c['sft'].pop('from_workdir', None)  # where an SFT model came from, not what it is

  def pick(c, key):
    for k in key.split('.'):
      c = c.get(k) if isinstance(c, dict) else None
    return c

  differ = [k for k in SFT_SOURCE_KEYS if pick(ours, k) != pick(theirs, k)]
  if differ:
    raise ValueError(
      f'sft.from_workdir={source!r} was trained with another {", ".join(differ)} than this '
      'run: ' + '; '.join(f'{k}: {pick(theirs, k)!r} there, {pick(ours, k)!r} here' for k in differ)
    )


def build_model(cfg, data, mesh):
  """A random-init preset sized to the tokenizer, or a Hugging Face checkpoint, created
  straight into the mesh's shardings in `model.param_dtype` (compute in `model.dtype`)."""
  dtype = getattr(jax.numpy, cfg.model.dtype)
  param_dtype = getattr(jax.numpy, cfg.model.param_dtype)
  if cfg.model.init_from:
    return models.load_hf(
      cfg.model.init_from,
      dtype=dtype,
      param_dtype=param_dtype,
      sharding_for=sharding.sharding_for_params(mesh),
      remat=cfg.model.remat,
      attention_chunk=cfg.model.attention_chunk,
    )
  config = models.get_config_for_tokens(cfg.model.preset, data.processors.ids)
  return sharding.init_sharded(
    lambda: models.Qwen2_5_VL(
      config,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=nnx.Rngs(cfg.seed),
      remat=cfg.model.remat,
      attention_chunk=cfg.model.attention_chunk,
    ),
    mesh,
  )


CHECKPOINT_CHOICES = ('last', 'best')
EXPORT_CHECKPOINT_FILE = 'cpo_jax_checkpoint.json'  # which checkpoint an export was made from


def final_stage(cfg, workdir, wanted, restoring):
  """The stage whose params the eval report (or export) uses: the last one `run` trains or
  restores, or None when it does neither (the random initialisation)."""
  if restoring:
    done = [s for s in ('cpo_plus', 'sft_more') if loop.has_checkpoint(workdir, s)]
    return done[0] if done else 'sft'
  trains = [s for s in ('cpo_plus', 'sft_more', 'sft') if s in wanted]
  return trains[0] if trains else ('sft' if cfg.sft.from_workdir else None)


def used_checkpoint(cfg, workdir, stage):
  """Which checkpoint of `stage` the report or export uses (eval.checkpoint): its stage, step,
  'last' or 'best', and the eval-during-training metrics of that step (None if not evaluated)."""
  stage_workdir = (cfg.sft.from_workdir or workdir) if stage == 'sft' else workdir
  if stage == 'sft' and cfg.sft.early_stop:  # SFT hands on its lowest held-out loss's params
    step = early_stop.read_record(stage_workdir, 'sft').get('best_step')
    metrics = _logged_eval(stage_workdir, stage, step)
    return {'stage': stage, 'step': step, 'checkpoint': 'val_best', 'metrics': metrics}
  if cfg.eval.checkpoint == 'best':
    step, metrics = loop.best_checkpoint(stage_workdir, stage)
  else:
    step = loop.latest_step(stage_workdir, stage)
    metrics = _logged_eval(stage_workdir, stage, step)
  return {'stage': stage, 'step': step, 'checkpoint': cfg.eval.checkpoint, 'metrics': metrics}


def _logged_eval(workdir, stage, step):
  """The eval/ metrics metrics.jsonl holds for (stage, step), the last such row (a resumed run
  may log a step again), or None."""
  file, found = paths.path(workdir) / 'metrics.jsonl', None
  for line in file.read_text().splitlines() if file.exists() else ():
    row = json.loads(line)
    if row['stage'] == stage and row['step'] == step and any(k.startswith('eval/') for k in row):
      found = {k: v for k, v in row.items() if k.startswith('eval/')}
  return found


def restore_latest(cfg, workdir):
  """The model of the workdir's latest checkpoints (SFT, plus CPO++ adapters if any); with
  eval.checkpoint='best', the last stage's best params."""
  return run(cfg, workdir, mode='restore')


def export(cfg, workdir, export_dir):
  """Writes the model `restore_latest` returns (LoRA merged) + tokenizer + image processor for
  transformers, and which checkpoint it is (EXPORT_CHECKPOINT_FILE). A gs:// export_dir is
  written locally first, then uploaded (process 0). Returns `used_checkpoint`."""
  model, data = restore_latest(cfg, workdir)
  used = used_checkpoint(cfg, workdir, final_stage(cfg, workdir, ['eval'], restoring=True))
  with paths.local_directory(export_dir, write=jax.process_index() == 0) as local:
    models.save_hf(model, local)
    if jax.process_index() == 0:
      data.processors.tokenizer.save_pretrained(local)
      data.processors.image_processor.save_pretrained(local)
      paths.write_json(paths.join(local, EXPORT_CHECKPOINT_FILE), used, indent=2)
  return used


def check_checkpoint_choice(cfg, workdir, mode, wanted):
  """Fails at start-up when eval.checkpoint cannot be honoured; returns the stage whose best
  params the run uses (`loop.run_stage(returns='best')`), or None."""
  choice = cfg.eval.checkpoint
  if choice not in CHECKPOINT_CHOICES:
    raise ValueError(f'config.eval.checkpoint={choice!r}; expected one of {CHECKPOINT_CHOICES}.')
  restoring = mode in ('eval', 'restore')
  if choice == 'last' or not (restoring or 'eval' in wanted):
    return None
  stage = final_stage(cfg, workdir, wanted, restoring)
  if stage is None:
    raise ValueError("eval.checkpoint='best', but this run neither trains nor restores a stage.")
  if stage == 'sft' and cfg.sft.early_stop:
    raise ValueError(
      "eval.checkpoint='best' with sft.early_stop: SFT hands on the params of its lowest "
      'held-out loss, not of its best evaluated step; use one of the two.'
    )
  if restoring:
    used_checkpoint(cfg, workdir, stage)  # raises naming the directory when there is none
  elif not cfg.eval.every_steps:
    raise ValueError(
      "eval.checkpoint='best' evaluates the best step of the last stage, which is kept only "
      'with eval.every_steps > 0; set it, or use eval.checkpoint=last.'
    )
  return stage


def run(cfg, workdir, mode='train'):
  """Runs the configured stages; returns the eval report (or None without an eval stage).

  mode='eval' restores the latest checkpoints and evaluates; mode='restore' returns
  (model, data) of the latest checkpoints.
  """
  wanted = parse_stages(cfg.stages) if mode == 'train' else ['eval']
  restoring = mode in ('eval', 'restore')
  sft_workdir = cfg.sft.from_workdir or workdir  # a shared SFT model is restored from there
  if restoring and not loop.has_checkpoint(sft_workdir, 'sft'):
    # Never the random initialisation labelled as a trained model.
    raise FileNotFoundError(
      f'--mode={"export" if mode == "restore" else mode}: no sft checkpoint under '
      f'{loop.checkpoint_dir(sft_workdir, "sft")}; train first, or check --workdir.'
    )
  best_of = check_checkpoint_choice(cfg, workdir, mode, wanted)
  returns = lambda stage: {'returns': 'best'} if stage == best_of else {}
  mesh = sharding.make_mesh(cfg.mesh.shape)
  cfg = stages.resolve_accumulation(cfg, mesh)
  if cfg.sft.from_workdir:
    check_sft_source(cfg, wanted)
  if jax.process_index() == 0:
    paths.write_text(paths.path(workdir) / 'config.json', cfg.to_json_best_effort(indent=2))
  # Before the data: a W&B project without the wandb package stops training here.
  wandb = wandb_writer.from_config(cfg, workdir) if mode == 'train' else None
  writer = writers.MetricsWriter(workdir, wandb)
  data = streams.RunData(cfg, workdir)
  model = build_model(cfg, data, mesh)
  common = dict(mesh=mesh, grid=data.grid, workdir=workdir, writer=writer)
  if cfg.eval.every_steps and data.eval_splits and mode == 'train':
    common.update(evaluate=report_lib.during_training(cfg, data), eval_every=cfg.eval.every_steps)
  if best_of and mode == 'train' and 'evaluate' not in common:
    raise ValueError("eval.checkpoint='best', but the data has no eval split to rank steps on.")

  # Eval restores whatever checkpoints exist; training runs (or resumes) each listed stage.
  # Each stage starts from the previous stage's final model, so cpo_plus and sft_more need sft's
  # (this workdir's, or with sft.from_workdir another's, restored and never trained here).
  trained = []
  try:
    if (
      'sft' in wanted
      or restoring
      or 'cpo_plus' in wanted
      or 'sft_more' in wanted
      or cfg.sft.from_workdir
    ):
      model = stages.train_sft(
        model,
        cfg,
        make_batches=data.sft_batches,
        make_val_batches=data.sft_val_batches,
        train='sft' in wanted,
        **dict(common, workdir=sft_workdir, **returns('sft')),
      )
      trained.append('sft')
    if 'sft_more' in wanted or (restoring and loop.has_checkpoint(workdir, 'sft_more')):
      model = stages.train_sft_more(
        model,
        cfg,
        make_batches=data.sft_more_batches,
        train='sft_more' in wanted,
        **common,
        **returns('sft_more'),
      )
      trained.append('sft_more')
    if 'cpo_plus' in wanted or (restoring and loop.has_checkpoint(workdir, 'cpo_plus')):
      # data.thinking_select='reference': the SFT model scores the candidates first.
      selection = (
        counterfactual_selection.for_run(model, cfg, data, mesh=mesh, workdir=workdir)
        if 'cpo_plus' in wanted
        else None
      )
      model = stages.train_cpo(
        model,
        cfg,
        make_batches=functools.partial(data.cpo_batches, selection=selection),
        image_processor=data.processors.image_processor,
        pair_layout=data.pair_layout,
        train='cpo_plus' in wanted,
        **common,
        **returns('cpo_plus'),
      )
      trained.append('cpo_plus')
  finally:
    writer.close()  # its event file complete now, not from an exit hook (gs:// may be gone)
  data.log_skips()
  if mode == 'restore':
    return model, data
  if 'eval' not in wanted:
    return None
  report = report_lib.run_eval(model, cfg, data, stage=trained[-1] if trained else 'init')
  report['checkpoint'] = used_checkpoint(cfg, workdir, trained[-1]) if trained else None
  report_lib.write_report(report, workdir)
  return report


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  cfg, workdir, mode = _CONFIG.value, _WORKDIR.value, _MODE.value
  if mode == 'plan':
    print(json.dumps(plan_lib.plan(cfg, _PLAN_STAGE.value)))
  elif mode == 'inspect':
    report = inspect_data.inspect(cfg, workdir)
    print('\n'.join(inspect_data.summary_lines(report)))
    print(f'details: {paths.join(workdir, "inspect")}/ (inspect.json, lengths.png, examples.png)')
  elif mode == 'export':
    if not _EXPORT_DIR.value:
      raise app.UsageError('--mode=export needs --export_dir.')
    used = export(cfg, workdir, _EXPORT_DIR.value)
    if jax.process_index() == 0:
      print(json.dumps({'export_dir': _EXPORT_DIR.value, 'checkpoint': used}))
  else:
    try:
      report = run(cfg, workdir, mode)
    except preemption.Preempted as e:  # saved; the scheduler restarts the command
      logging.warning('%s', e)
      return
    if report is not None and jax.process_index() == 0:
      print(json.dumps(summary(report)))


def summary(report):
  """The headline numbers of a report: accuracy and n per split (and the SFT baseline)."""
  brief = lambda splits: {
    s: {'accuracy': r['accuracy'] and round(r['accuracy'], 4), 'n': r['n']}
    for s, r in splits.items()
  }
  out = {
    'stage': report['stage'],
    'checkpoint': report.get('checkpoint'),
    'splits': brief(report['splits']),
  }
  if 'baseline' in report:
    out['baseline'] = {
      'stage': report['baseline']['stage'],
      'splits': brief(report['baseline']['splits']),
    }
  return out


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
