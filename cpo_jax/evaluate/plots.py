"""The eval report's plots: accuracy per split, training curves, robustness curves, the
concept readout, and the paper's findings and report-generation metrics (PNG)."""

from __future__ import annotations

import json
from typing import Mapping

import matplotlib
import numpy as np

from cpo_jax import paths
from cpo_jax.evaluate.concept_readout import misread_by_nuisance
from cpo_jax.evaluate.interference import PERCEPTION_KINDS
from cpo_jax.evaluate.interference import THINKING_KINDS

matplotlib.use('Agg')  # files only; no display on servers and TPU VMs.
from matplotlib import pyplot as plt  # noqa: E402


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
    values = [splits[s]['accuracy'] for s in names]  # None: a split without labelled rows
    ax.bar(xs, [v or 0.0 for v in values], width, label=label)
    for x, v in zip(xs, values):
      ax.text(x, (v or 0.0) + 0.01, 'n/a' if v is None else f'{v:.2f}', ha='center', fontsize=8)
  ax.axhline(report['chance_accuracy'], color='gray', ls='--', lw=1, label='chance')
  ax.set_xticks(np.arange(len(names)), names)
  ax.set_ylim(0, 1.1)
  ax.set_ylabel('decision accuracy')
  ax.set_title(f"{report['domain']}: decision accuracy per split")
  ax.legend(loc='lower left', fontsize=8)
  fig.tight_layout()
  paths.save_figure(fig, path, dpi=100)
  plt.close(fig)


def plot_training_curves(metrics_path, path):
  """Loss per stage, and the CPO++ reward accuracies overall and per pair source."""
  rows = [json.loads(line) for line in paths.path(metrics_path).read_text().splitlines()]
  stages = list(dict.fromkeys(r['stage'] for r in rows))
  fig, axes = plt.subplots(1, len(stages) + 1, figsize=(4.5 * (len(stages) + 1), 3.5))
  for ax, stage in zip(axes, stages):
    rs = [r for r in rows if r['stage'] == stage and 'loss' in r]  # not eval.every_steps rows
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
  paths.save_figure(fig, path, dpi=100)
  plt.close(fig)


def plot_robustness(report_section: Mapping, path: str) -> None:
  """Accuracy vs severity per interference kind (perception; thinking by number of edited
  sentences) and the drift bars. `report_section` holds 'interference' and/or 'drift' (e.g.
  the whole report)."""
  interference = report_section.get('interference', {})
  drift_result = report_section.get('drift')
  clean = interference.get('none', {}).get('0')
  fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
  for ax, kinds, xlabel in (
    (axes[0], PERCEPTION_KINDS, 'severity'),
    (axes[1], THINKING_KINDS, 'edited concept sentences'),
  ):
    for kind in (k for k in kinds if k in interference):
      points = sorted((float(s), a) for s, a in interference[kind].items() if a is not None)
      if kind in PERCEPTION_KINDS and clean is not None:
        points = [(0.0, clean)] + points  # severity 0 is the clean image.
      if points:
        ax.plot(*zip(*points), marker='o', label=kind)
    if clean is not None:
      ax.axhline(clean, color='gray', ls=':', lw=1)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel(xlabel)
    ax.set_ylabel('decision accuracy')
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  axes[0].set_title('perception interference')
  axes[1].set_title('thinking interference (teacher-forced)')
  ax = axes[2]
  if drift_result:
    labels = ['all'] + list(drift_result.get('per_concept', {}))
    rows = [drift_result] + list(drift_result.get('per_concept', {}).values())
    x = np.arange(len(labels))
    for offset, key, name in (
      (-0.2, 'outcome_shift', 'synonym (outcome_shift)'),
      (0.2, 'counterfactual_shift', 'contradict'),
    ):
      ax.bar(x + offset, [r.get(key) or 0.0 for r in rows], width=0.4, label=name)
    ax.set_xticks(x, labels, rotation=30, ha='right', fontsize=7)
    ax.legend(fontsize=7)
  ax.set_ylim(0, 1.05)
  ax.set_ylabel('total variation')
  ax.set_title('drift probe')
  fig.tight_layout()
  paths.save_figure(fig, path, dpi=100)
  plt.close(fig)


def plot_paper_metrics(report, path) -> bool:
  """Per split: the chains' report-generation scores and, where labelled, each finding's F1 and
  AUC (beside the SFT baseline's when the report has one). False when there is nothing to plot."""
  runs = [(report['stage'], report['splits'])]
  if 'baseline' in report:
    runs.insert(0, (report['baseline']['stage'], report['baseline']['splits']))
  panels = []  # (title, labels, [(run label, values)])
  for split, section in report['splits'].items():
    if 'report_generation' in section:
      keys = ['bleu_1', 'bleu_2', 'bleu_3', 'bleu_4', 'rouge_l', 'meteor', 'cider']
      values = [(label, [s[split]['report_generation'][k] for k in keys]) for label, s in runs]
      panels.append((f'{split}: generated chain vs gold', keys, values))
    if 'findings' in section:
      names = list(section['findings']['per_finding'])
      for metric in ('f1', 'auc'):
        values = [
          (label, [s[split]['findings']['per_finding'][n][metric] for n in names])
          for label, s in runs
        ]
        panels.append((f'{split}: finding {metric.upper()}', names, values))
  if not panels:
    return False
  fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.2 * len(panels)), squeeze=False)
  for ax, (title, labels, values) in zip(axes[:, 0], panels):
    width = 0.8 / len(values)
    for j, (label, ys) in enumerate(values):
      xs = np.arange(len(labels)) + (j - (len(values) - 1) / 2) * width
      ax.bar(xs, [np.nan if y is None else y for y in ys], width, label=label)  # None: n/a
    ax.set_xticks(np.arange(len(labels)), labels, rotation=30, ha='right', fontsize=8)
    ax.set_title(title)
    ax.legend(fontsize=8)
  fig.tight_layout()
  paths.save_figure(fig, path, dpi=100)
  plt.close(fig)
  return True


def plot_concept_readout(report, path) -> None:
  """Per run (the SFT baseline first when the report has one): the share of records whose
  gold concept value is not the most probable teacher-forced sentence, as a heat map of
  concept x nuisance value; bars per concept when the records carry no nuisance."""
  runs = [(report['stage'], report['concept_readout'])]
  if 'concept_readout' in report.get('baseline', {}):
    runs.insert(0, (report['baseline']['stage'], report['baseline']['concept_readout']))
  fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.8), squeeze=False)
  for ax, (label, section) in zip(axes[0], runs):
    title = f"{label}: concept misread share ({section['split']}, n={section['n']})"
    concepts, values, table = misread_by_nuisance(section)
    if not concepts:  # no nuisance on the records: one bar per concept
      names = list(section['per_concept'])
      shares = [section['per_concept'][c]['misread'] for c in names]
      ax.bar(np.arange(len(names)), [np.nan if v is None else v for v in shares])
      ax.set_xticks(np.arange(len(names)), names, rotation=30, ha='right', fontsize=8)
      ax.set_ylim(0, 1.05)
      ax.set_title(title, fontsize=9)
      continue
    image = ax.imshow(table, vmin=0, vmax=1, cmap='Reds', aspect='auto')
    for (i, j), v in np.ndenumerate(table):
      text, color = (
        ('n/a', 'black') if np.isnan(v) else (f'{v:.2f}', 'white' if v > 0.6 else 'black')
      )
      ax.text(j, i, text, ha='center', va='center', fontsize=8, color=color)
    ax.set_xticks(np.arange(len(values)), values, fontsize=8)
    ax.set_yticks(np.arange(len(concepts)), concepts, fontsize=8)
    ax.set_xlabel('nuisance value')
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046)
  fig.tight_layout()
  paths.save_figure(fig, path, dpi=100)
  plt.close(fig)
