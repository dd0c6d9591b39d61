r"""Ablation harness: seeds x arms from one shared SFT model per seed -> table, JSON and plot.

  python -m cpo_jax.ablate --config=configs/driving.py --seeds=0,1,2,3,4 \
      --arms=sft,sft_more,sft_more_chosen,dpo_random,cpo_perception,cpo_both,cpo_plus --workdir=DIR

Per seed it trains one SFT model (DIR/seed_<s>/sft_model, `config.stages=sft`; arms of another
SFT model, such as the early-stopped one of `*_early`, share DIR/seed_<s>/sft_model_<name>), then
runs each arm in DIR/seed_<s>/<arm> from that checkpoint (`sft.from_workdir`: restored, never
retrained) and evaluates it on the same examples (the same eval splits, eval.max_examples and
probe seed; the report's own SFT baseline is off: the `sft` arm measures that model once). Every
arm is a config switch that main.py runs the same way (`ablation_arms.ARMS`). `--config.*`
overrides pass through to every run; `config.seed`, `config.stages`, `sft.from_workdir` and
`eval.baseline` are set per run by the harness (`--seeds`, the arms). A run whose report exists
(an SFT model: whose last checkpoint exists) is reused; a half-finished one resumes from its checkpoints; a run directory
written with another config is an error, never mixed in. After each run the table over the
finished runs is written: DIR/ablation.md, ablation.json, ablation.png (ablation_report.py).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Callable

from absl import app
from absl import flags
from absl import logging
import jax

from cpo_jax import ablation_arms
from cpo_jax import ablation_report
from cpo_jax import ablation_stats
from cpo_jax import main as main_lib
from cpo_jax import paths
from cpo_jax import sharding
from cpo_jax.train import loop
from cpo_jax.train import stages as stages_lib


@dataclasses.dataclass
class Run:
  seed: int
  name: str  # an arm, or an SFT model (ablation_arms.sft_model_name)
  workdir: str
  cfg: object

  @property
  def label(self):
    return f'seed {self.seed} {self.name}'


def _set(cfg, dotted, value):
  *parents, leaf = dotted.split('.')
  for p in parents:
    cfg = cfg[p]
  cfg[leaf] = value


def seed_dir(workdir, seed):
  return paths.join(workdir, f'seed_{seed}')


def plan_runs(base_cfg, seeds, arms, workdir) -> list[Run]:
  """Per seed: the SFT models the arms start from (`ablation_arms.SFT_MODELS`), then each arm from its
  model (in the order given)."""
  unknown = [a for a in arms if a not in ablation_arms.ARMS]
  if unknown:
    raise ValueError(f'--arms has unknown arm(s) {unknown}; known: {list(ablation_arms.ARMS)}.')
  if len(set(seeds)) != len(seeds) or len(set(arms)) != len(arms):
    raise ValueError(f'--seeds {list(seeds)} and --arms {list(arms)} must not repeat.')
  runs = []
  variants = list(dict.fromkeys(ablation_arms.ARMS[a].sft for a in arms)) or ['']
  for seed in seeds:
    sft_dirs = {}
    for variant in variants:
      name = ablation_arms.sft_model_name(variant)
      sft_dirs[variant] = paths.join(seed_dir(workdir, seed), name)
      cfg = base_cfg.copy_and_resolve_references()
      cfg.seed, cfg.stages, cfg.sft.from_workdir = seed, 'sft', ''
      for key, value in ablation_arms.SFT_MODELS[variant]:
        _set(cfg, key, value)
      runs.append(Run(seed, name, sft_dirs[variant], cfg))
    for arm in arms:
      spec = ablation_arms.ARMS[arm]
      cfg = base_cfg.copy_and_resolve_references()
      cfg.seed, cfg.stages = seed, spec.stages
      cfg.sft.from_workdir = sft_dirs[spec.sft]
      cfg.eval.baseline = False  # the `sft` arm measures the SFT model once
      for key, value in ablation_arms.SFT_MODELS[spec.sft] + spec.overrides:
        _set(cfg, key, value)
      runs.append(Run(seed, arm, paths.join(seed_dir(workdir, seed), arm), cfg))
  return runs


def resolved_config(cfg) -> dict:
  """The config as main.run writes it to <workdir>/config.json."""
  cfg = stages_lib.resolve_accumulation(cfg, sharding.make_mesh(cfg.mesh.shape))
  return json.loads(cfg.to_json_best_effort())


def _flat(d, prefix=''):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _flat(v, f'{prefix}{k}.')
    else:
      yield f'{prefix}{k}', v


def run_state(run: Run) -> str:
  """'done' (reuse), 'partial' (resume) or 'new'. A run directory written with another config
  is an error naming the differing keys; for the shared SFT model only what SFT depends on
  counts (main.SFT_SOURCE_KEYS), so arms with other CPO++ settings reuse it. A key only one
  side has (a knob added to the code since, at its default) is a warning, not a difference."""
  config_file = paths.path(run.workdir) / 'config.json'
  if not config_file.exists():
    return 'new'
  theirs = dict(_flat(json.loads(config_file.read_text())))
  ours = dict(_flat(resolved_config(run.cfg)))
  keys = theirs.keys() & ours.keys()
  if theirs.keys() ^ ours.keys():
    logging.warning(
      '%s: config keys only it has %s, only this run has %s (compared: the others)',
      run.workdir,
      sorted(theirs.keys() - ours.keys()),
      sorted(ours.keys() - theirs.keys()),
    )
  if ablation_arms.is_sft_model(run.name):
    keys = {
      k for k in keys if any(k == p or k.startswith(p + '.') for p in main_lib.SFT_SOURCE_KEYS)
    }
  differ = sorted(k for k in keys if theirs.get(k) != ours.get(k))
  if differ:
    raise ValueError(
      f'{run.workdir} was run with another config ('
      + '; '.join(f'{k}: {theirs.get(k)!r} there, {ours.get(k)!r} now' for k in differ[:8])
      + '); use another --workdir, or delete that directory to run it again.'
    )
  if ablation_arms.is_sft_model(run.name):
    done = loop.stage_finished(run.workdir, 'sft', run.cfg.sft.num_steps)
  else:
    done = (paths.path(run.workdir) / 'eval' / 'report.json').exists()
  return 'done' if done else 'partial'


def _timing_file(run):
  return paths.path(run.workdir) / 'ablation_run.json'


def _duration(seconds):
  seconds = int(round(seconds))
  return f'{seconds // 60}m{seconds % 60:02d}s'


def _eta(pending, seconds_by_name):
  """Seconds left: each pending run as the mean of the measured runs of its name (else of all
  measured arms); None while nothing was measured."""
  arm_times = [
    t for n, ts in seconds_by_name.items() if not ablation_arms.is_sft_model(n) for t in ts
  ]
  total = 0.0
  for run in pending:
    known = seconds_by_name.get(run.name) or (
      None if ablation_arms.is_sft_model(run.name) else arm_times
    )
    if not known:
      return None
    total += sum(known) / len(known)
  return total


def collect(runs, arms):
  """values[arm][metric][seed] of the finished arm runs (NaN where not measured)."""
  values = {arm: {m: {} for m in ablation_report.METRICS} for arm in arms}
  for run in runs:
    report_file = paths.path(run.workdir) / 'eval' / 'report.json'
    if ablation_arms.is_sft_model(run.name) or not report_file.exists():
      continue
    metrics_file = paths.path(run.workdir) / 'metrics.jsonl'
    rows = (
      [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
      if metrics_file.exists()
      else []
    )
    measured = ablation_report.run_metrics(
      json.loads(report_file.read_text()), rows, run.cfg.cpo.beta
    )
    for metric, value in measured.items():
      values[run.name][metric][run.seed] = value
  return values


def ablate(
  base_cfg,
  seeds,
  arms,
  workdir,
  *,
  compare=(),
  run_fn: Callable = main_lib.run,
  clock: Callable[[], float] = time.monotonic,
  out=sys.stdout,
):
  """Runs (or reuses) every seed's SFT model and arms, writes the table after each run, and
  returns {'summary', 'comparisons', 'values', 'runs'}; 'runs' says per run whether it was
  reused, resumed or ran from the start, and its wall time in seconds (of the invocation that
  finished it). `compare`: (a, b) arm pairs whose paired differences a - b the table adds."""
  runs = plan_runs(base_cfg, list(seeds), list(arms), workdir)
  states = [run_state(run) for run in runs]  # config mismatches stop here, before any work
  seconds_by_name = {}
  for run, state in zip(runs, states):
    if state == 'done' and _timing_file(run).exists():
      seconds = json.loads(_timing_file(run).read_text())['seconds']
      seconds_by_name.setdefault(run.name, []).append(seconds)
  record, started = [], clock()

  def say(i, run, text):
    print(f'[{i + 1}/{len(runs)}] {run.label}: {text}', file=out, flush=True)

  for i, (run, state) in enumerate(zip(runs, states)):
    if state == 'done':
      record.append(dict(seed=run.seed, run=run.name, status='reused', **_seconds_of(run)))
      say(i, run, f'reused ({run.workdir})')
      continue
    say(i, run, 'resuming' if state == 'partial' else 'running')
    t0 = clock()
    run_fn(run.cfg, run.workdir)
    seconds = clock() - t0
    paths.write_json(_timing_file(run), {'seconds': seconds})
    seconds_by_name.setdefault(run.name, []).append(seconds)
    status = 'resumed' if state == 'partial' else 'ran'
    record.append(dict(seed=run.seed, run=run.name, status=status, seconds=seconds))
    eta = _eta([r for r, s in zip(runs[i + 1 :], states[i + 1 :]) if s != 'done'], seconds_by_name)
    say(
      i,
      run,
      f'{status} in {_duration(seconds)} (elapsed {_duration(clock() - started)}, '
      f'ETA {"?" if eta is None else _duration(eta)})',
    )
    if not ablation_arms.is_sft_model(run.name):
      _write(workdir, base_cfg, runs, arms, seeds, record, compare)
  return _write(workdir, base_cfg, runs, arms, seeds, record, compare)


def _seconds_of(run):
  f = _timing_file(run)
  return {'seconds': json.loads(f.read_text())['seconds']} if f.exists() else {}


def _write(workdir, base_cfg, runs, arms, seeds, record, compare):
  values = collect(runs, arms)
  table = ablation_stats.summarize(values, ablation_arms.REFERENCE_ARM)
  comparisons = ablation_stats.compare(values, compare)
  ablation_report.write_outputs(
    workdir,
    table=table,
    values=values,
    arms=arms,
    seeds=seeds,
    reference=ablation_arms.REFERENCE_ARM,
    runs=record,
    config=base_cfg,
    comparisons=comparisons,
  )
  return {'summary': table, 'comparisons': comparisons, 'values': values, 'runs': record}


def parse_compare(items, known):
  """['a:b', ...] -> [(a, b), ...]; an unknown arm or a malformed item is an error."""
  pairs = []
  for item in items:
    a, sep, b = item.partition(':')
    if not sep or a not in known or b not in known or a == b:
      raise app.UsageError(
        f'--compare item {item!r}: expected arm:other_arm, arms of {list(known)}.'
      )
    pairs.append((a, b))
  return pairs


# --config (with its --config.* overrides) and --workdir are the flags cpo_jax.main defines.
_SEEDS = flags.DEFINE_list('seeds', ['0'], 'Seeds (config.seed of every run).')
_ARMS = flags.DEFINE_list('arms', list(ablation_arms.ARMS), f'Arms, of {list(ablation_arms.ARMS)}.')
_COMPARE = flags.DEFINE_list(
  'compare',
  ['cpo_plus:dpo_random', 'cpo_plus:sft_more', 'cpo_plus:sft_more_chosen'],
  'Arm pairs a:b whose per-seed paired difference a - b the table adds (pairs with an arm '
  'not run are left out): what the preference adds over a control on the same SFT models.',
)
_COMPILATION_CACHE = flags.DEFINE_bool(
  'compilation_cache',
  True,
  'Keep XLA programs in <workdir>/jax_cache (local workdirs): every seed and most arms compile '
  'the same steps, inits and decoding, and a rerun finds them there.',
)


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  if not flags.FLAGS['workdir'].present:
    raise app.UsageError('--workdir is required: where the runs and the table go.')
  workdir = flags.FLAGS.workdir
  if _COMPILATION_CACHE.value and not paths.is_remote(workdir):
    jax.config.update('jax_compilation_cache_dir', paths.join(workdir, 'jax_cache'))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  ablate(
    flags.FLAGS.config,
    [int(s) for s in _SEEDS.value],
    _ARMS.value,
    workdir,
    compare=parse_compare(_COMPARE.value, ablation_arms.ARMS),
  )
  table = paths.path(workdir) / 'ablation.md'
  print(f'\n{table.read_text()}\n{table} (and ablation.json, ablation.png)')


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
