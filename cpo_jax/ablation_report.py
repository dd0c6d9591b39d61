"""What one ablation run measured, and the ablation's table as markdown, JSON and a plot.

`run_metrics` reads the numbers of one arm on one seed from its eval report (report.json) and
its training log (metrics.jsonl rows): pure functions of those dicts. `write_outputs` writes the
table that `ablation_stats.summarize` computed over the seeds.

The interference curves' area (no single number in the report): for each interference kind,
the area under accuracy against severity by the trapezoid rule, divided by the severity range,
so it is the curve's mean accuracy over that range (one severity: its accuracy). Perception
kinds start at severity 0 with the clean accuracy (`interference.none.0`), as their plot does;
thinking kinds (teacher-forced chain edits) run over their own severities (edited sentences).
The area of a side is the mean over its kinds; a kind with an unmeasured point is NaN.
"""

from __future__ import annotations

import json
import math
from typing import Mapping
from typing import Sequence

import matplotlib

from cpo_jax import paths
from cpo_jax.ablation_stats import as_float
from cpo_jax.ablation_stats import finite_or_none
from cpo_jax.evaluate.interference import PERCEPTION_KINDS
from cpo_jax.evaluate.interference import THINKING_KINDS

matplotlib.use('Agg')  # files only
from matplotlib import pyplot as plt  # noqa: E402

# name -> (what it is, which way is better)
METRICS = {
  'test_accuracy': ('decision accuracy on `test` (greedy, parsed with the concept graph)', 'up'),
  'ood_accuracy': ('decision accuracy on `ood` (the nuisance no longer predicts the answer)', 'up'),
  'test_unparsed': ('share of labelled `test` answers that name no decision', 'down'),
  'ood_unparsed': ('share of labelled `ood` answers that name no decision', 'down'),
  'counterfactual_follow': (
    'drift probe: the answer follows a teacher-forced chain that contradicts the image',
    'down',
  ),
  'outcome_shift': (
    'drift probe: total variation of the answer distribution when one chain sentence is '
    'swapped for a near-synonym',
    'down',
  ),
  'concept_misread': (
    'concept readout: mean over concepts of the share of robustness-split records whose gold '
    'concept sentence is not the most probable (teacher-forced after the gold sentences before it)',
    'down',
  ),
  'perception_interference_area': (
    'mean over perception interference kinds of the accuracy-severity curve area (clean = 0)',
    'up',
  ),
  'thinking_interference_area': (
    'mean over thinking interference kinds (teacher-forced chain edits) of the curve area',
    'up',
  ),
  'chosen_logp_change': (
    'CPO stage: mean log pi(chosen) - log pi_ref(chosen) on its last logged batch '
    '(rewards/chosen / beta; nats per completion); NaN without a preference stage',
    '',
  ),
}


def curve_area(points: Mapping[str, float | None], clean: float | None = None) -> float:
  """Normalised area under accuracy vs severity ({severity: accuracy}; `clean` adds severity 0)."""
  xy = sorted((float(s), as_float(a)) for s, a in points.items())
  if clean is not None:
    xy = [(0.0, as_float(clean))] + [p for p in xy if p[0] != 0.0]
  if not xy or any(math.isnan(a) for _, a in xy):
    return math.nan
  if len(xy) == 1:
    return xy[0][1]
  area = sum((x1 - x0) * (a0 + a1) / 2 for (x0, a0), (x1, a1) in zip(xy, xy[1:]))
  return area / (xy[-1][0] - xy[0][0])


def interference_area(interference: Mapping, kinds: Sequence[str], from_clean: bool) -> float:
  clean = interference.get('none', {}).get('0') if from_clean else None
  areas = [
    curve_area(interference[k], clean if from_clean else None) for k in kinds if k in interference
  ]
  return sum(areas) / len(areas) if areas else math.nan


def run_metrics(report: Mapping, rows: Sequence[Mapping], beta: float) -> dict[str, float]:
  """The METRICS of one run (NaN where not measured) from its report.json and metrics.jsonl."""
  out = {}
  for split in ('test', 'ood'):
    section = report.get('splits', {}).get(split, {})
    n = section.get('n') or 0
    out[f'{split}_accuracy'] = as_float(section.get('accuracy'))
    out[f'{split}_unparsed'] = section['unparsed'] / n if n else math.nan
  drift = report.get('drift', {})
  out['counterfactual_follow'] = as_float(drift.get('counterfactual_follow'))
  out['outcome_shift'] = as_float(drift.get('outcome_shift'))
  out['concept_misread'] = as_float(report.get('concept_readout', {}).get('misread'))
  interference = report.get('interference', {})
  out['perception_interference_area'] = interference_area(interference, PERCEPTION_KINDS, True)
  out['thinking_interference_area'] = interference_area(interference, THINKING_KINDS, False)
  logged = [r for r in rows if r.get('stage') == 'cpo_plus' and 'rewards/chosen' in r]
  out['chosen_logp_change'] = (
    max(logged, key=lambda r: r['step'])['rewards/chosen'] / beta if logged else math.nan
  )
  return out


def _cell(summary: Mapping, seeds: int, signed: bool = False) -> str:
  """'mean [low, high]', '(n=k)' appended when fewer than all `seeds` were measured."""
  mean, low, high, n = summary['mean'], summary['low'], summary['high'], summary['n']
  if mean is None:
    return 'n/a'
  f = (lambda v: f'{v:+.3f}') if signed else (lambda v: f'{v:.3f}')
  text = f(mean) if low is None else f'{f(mean)} [{f(low)}, {f(high)}]'
  return text if n == seeds else f'{text} (n={n})'


def markdown(
  table: Mapping,
  arms: Sequence[str],
  seeds: Sequence[int],
  reference: str,
  comparisons: Mapping | None = None,
) -> str:
  """Tables with metric rows: per arm the mean [95% interval] over seeds, the paired difference
  against the reference arm, and per comparison 'a - b' (ablation_stats.compare) its paired
  difference."""
  head = '| metric | ' + ' | '.join(f'`{a}`' for a in arms) + ' |\n'
  rule = '| --- |' + ' --- |' * len(arms) + '\n'
  arrow = {'up': ' (higher is better)', 'down': ' (lower is better)', '': ''}

  def rows(paired):
    lines = []
    for metric, (_, better) in METRICS.items():
      cells = []
      for arm in arms:
        s = table.get(arm, {}).get(metric)
        if paired:
          s = s and s['paired']
        cells.append('' if s is None else _cell(s, len(seeds), signed=paired))
      lines.append(f'| `{metric}`{arrow[better]} | ' + ' | '.join(cells) + ' |\n')
    return ''.join(lines)

  n = len(seeds)
  out = (
    f'Seeds {", ".join(map(str, seeds))}: mean over seeds and its 95% t-interval (none with '
    f'one seed); (n=k): only k of the {n} seeds finished.\n\n' + head + rule + rows(False)
  )
  if reference in arms and len(arms) > 1:
    out += (
      f'\nPaired difference against `{reference}` (same seed, same SFT checkpoint and '
      f'examples): mean and 95% t-interval of the per-seed differences.\n\n'
      + head
      + rule
      + rows(True)
    )
  if comparisons:
    names = list(comparisons)
    out += (
      '\nPaired difference between arms (per seed, one arm minus the other): mean and 95% '
      't-interval.\n\n| metric | '
      + ' | '.join(f'`{c}`' for c in names)
      + ' |\n| --- |'
      + ' --- |' * len(names)
      + '\n'
    )
    for metric, (_, better) in METRICS.items():
      cells = [_cell(comparisons[c][metric], len(seeds), signed=True) for c in names]
      out += f'| `{metric}`{arrow[better]} | ' + ' | '.join(cells) + ' |\n'
  out += '\n' + ''.join(f'* `{m}`: {what}\n' for m, (what, _) in METRICS.items())
  return out


def plot(table: Mapping, values: Mapping, arms: Sequence[str], reference: str, path) -> None:
  """One panel per metric: each arm's per-seed values (dots) and mean with its interval, and
  the reference arm's mean as a dashed line."""
  names = list(METRICS)
  cols = 3
  rows = -(-len(names) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
  for ax, metric in zip(axes.flat, names):
    for i, arm in enumerate(arms):
      per_seed = [as_float(v) for v in values.get(arm, {}).get(metric, {}).values()]
      ax.plot([i] * len(per_seed), per_seed, 'o', color='0.6', ms=4, zorder=1)
      s = table.get(arm, {}).get(metric)
      if s is None or s['mean'] is None:
        continue
      err = None
      if s['low'] is not None:
        err = [[s['mean'] - s['low']], [s['high'] - s['mean']]]
      ax.errorbar([i], [s['mean']], yerr=err, fmt='s', color='C0', capsize=4, zorder=2)
    ref = table.get(reference, {}).get(metric)
    if ref is not None and ref['mean'] is not None:
      ax.axhline(ref['mean'], color='gray', ls='--', lw=1)
    ax.set_xlim(-0.5, len(arms) - 0.5)
    ax.set_xticks(range(len(arms)), arms, rotation=30, ha='right', fontsize=8)
    ax.set_title(metric, fontsize=9)
  for ax in axes.flat[len(names) :]:
    ax.axis('off')
  fig.suptitle(
    f'ablation: mean over seeds, 95% t-interval, per-seed values (grey), {reference} (dashed)'
  )
  fig.tight_layout()
  paths.save_figure(fig, path, dpi=100)
  plt.close(fig)


def write_outputs(
  workdir, *, table, values, arms, seeds, reference, runs, config, comparisons=None
) -> None:
  """<workdir>/ablation.md, ablation.json (every per-seed value, the summary, the arm-against-arm
  comparisons, the runs and their times) and ablation.png."""
  out = paths.path(workdir)
  paths.write_text(out / 'ablation.md', markdown(table, arms, seeds, reference, comparisons))
  record = {
    'seeds': list(seeds),
    'arms': list(arms),
    'reference': reference,
    'confidence': 0.95,
    'metrics': {m: what for m, (what, _) in METRICS.items()},
    'summary': table,
    'comparisons': comparisons or {},
    'values': {
      arm: {m: {str(s): finite_or_none(v) for s, v in per.items()} for m, per in ms.items()}
      for arm, ms in values.items()
    },
    'runs': list(runs),
    'config': json.loads(config.to_json_best_effort()),
  }
  paths.write_json(out / 'ablation.json', record, indent=2)
  plot(table, values, arms, reference, out / 'ablation.png')
