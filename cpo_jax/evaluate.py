"""Evaluation: decision accuracy / per-class F1 per split, robustness (interference curves,
drift probe), for the final model and its SFT baseline; written as eval/report.json + plots.
"""

import json
import os

import matplotlib
import numpy as np

matplotlib.use('Agg')  # files only; no display on servers and TPU VMs.
from matplotlib import pyplot as plt  # noqa: E402

from cpo_jax import answers  # noqa: E402
from cpo_jax import robustness  # noqa: E402
from cpo_jax.models import lora  # noqa: E402


def write_report(report, workdir):
  out = os.path.join(workdir, 'eval')
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'report.json'), 'w') as f:
    json.dump(report, f, indent=2)
  plot_accuracy(report, os.path.join(out, 'accuracy.png'))
  if 'interference' in report:
    robustness.plot_robustness(report, os.path.join(out, 'robustness.png'))
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(metrics_path):
    plot_training_curves(metrics_path, os.path.join(out, 'training_curves.png'))


def plot_accuracy(report, path):
  """Accuracy per split, beside the SFT baseline when the report has one, against chance."""
  runs = [(report['stage'], report['splits'])]
  if 'baseline' in report:
    runs.insert(0, (report['baseline']['stage'], report['baseline']['splits']))
  names = list(report['splits'])
  width = 0.8 / len(runs)
  fig, ax = plt.subplots(figsize=(3 + 1.5 * len(names), 3.5))
  for j, (label, splits) in enumerate(runs):
    xs = np.arange(len(names)) + (j - (len(runs) - 1) / 2) * width
    values = [splits[s]['accuracy'] for s in names]
    ax.bar(xs, values, width, label=label)
    for x, v in zip(xs, values):
      ax.text(x, v + 0.01, f'{v:.2f}', ha='center', fontsize=8)
  ax.axhline(report['chance_accuracy'], color='gray', ls='--', lw=1, label='chance')
  ax.set_xticks(np.arange(len(names)), names)
  ax.set_ylim(0, 1.1)
  ax.set_ylabel('decision accuracy')
  ax.set_title(f"{report['domain']}: decision accuracy per split")
  ax.legend(loc='lower left', fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_training_curves(metrics_path, path):
  """Loss per stage, and the CPO++ reward accuracies overall and per pair source."""
  rows = [json.loads(line) for line in open(metrics_path)]
  stages = list(dict.fromkeys(r['stage'] for r in rows))
  fig, axes = plt.subplots(1, len(stages) + 1, figsize=(4.5 * (len(stages) + 1), 3.5))
  for ax, stage in zip(axes, stages):
    rs = [r for r in rows if r['stage'] == stage]
    ax.plot([r['step'] for r in rs], [r['loss'] for r in rs])
    ax.set_title(f'{stage} loss')
    ax.set_xlabel('step')
  ax = axes[-1]
  cpo = [r for r in rows if r['stage'] == 'cpo_plus']
  for key in ('rewards/accuracies', 'thinking/rewards/accuracies', 'perception/rewards/accuracies'):
    points = [(r['step'], r[key]) for r in cpo if key in r]
    if points:
      ax.plot(*zip(*points), label=key)
  ax.set_title('CPO++ reward accuracy')
  ax.set_xlabel('step')
  ax.set_ylim(-0.05, 1.05)
  if cpo:
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def evaluate_splits(model, cfg, data):
  """{split: classification metrics (+ a few generated texts)} for the configured splits."""
  graph, out = data.graph, {}
  for split in cfg.eval.splits.split(','):
    predicted, gold, texts = answers.predict_decisions(
      model,
      data.eval_batches(split),
      tokenizer=data.processors.tokenizer,
      graph=graph,
      max_new_tokens=cfg.eval.max_new_tokens,
      desc=f'eval {split}',
    )
    out[split] = dict(
      answers.classification_metrics(predicted, gold, graph.decisions), examples=texts[:3]
    )
  return out


def robustness_sections(model, cfg, data):
  """`interference.<kind>.<severity>` (accuracy under that interference) and `drift`
  (answer shift when one concept in the chain is substituted) on `eval.robustness_split`."""
  split, n = cfg.eval.robustness_split, cfg.eval.robustness_max_examples
  batches = lambda: data.eval_batches(split, max_examples=n)
  kw = dict(processors=data.processors, graph=data.graph, rng_seed=cfg.seed)
  return {
    'robustness_split': split,
    'interference': robustness.interference_report(
      model, batches, max_new_tokens=cfg.eval.max_new_tokens, **kw
    ),
    'drift': robustness.drift_probe(model, batches(), **kw),
  }


def run_eval(model, cfg, data, *, stage):
  """The eval report (DESIGN.md contract: splits.<split>.accuracy and n, interference,
  drift.outcome_shift).

  After CPO++ the same model with its adapters off is the SFT model, so the report also
  carries that baseline, measured on the same examples: the method's effect in one file.
  """
  graph = data.graph

  def measure(m):
    out = {'splits': evaluate_splits(m, cfg, data)}
    if cfg.eval.robustness:
      out.update(robustness_sections(m, cfg, data))
    return out

  report = {
    'domain': cfg.domain,
    'stage': stage,
    'decisions': list(graph.decisions),
    'chance_accuracy': 1.0 / len(graph.decisions),
    **measure(model),
  }
  if stage == 'cpo_plus':
    with lora.adapters_disabled(model):
      report['baseline'] = {'stage': 'sft', **measure(model)}
  return report
