"""The eval report: accuracy per split, robustness, for the final model and its SFT baseline.

Written as <workdir>/eval/report.json plus plots (`plots.py`).
"""

from __future__ import annotations

import functools

from absl import logging
import jax
import numpy as np

from cpo_jax import paths
from cpo_jax.data import bad_records
from cpo_jax.data import eval_batches
from cpo_jax.data.mimic_files import FINDINGS
from cpo_jax.evaluate import answers
from cpo_jax.evaluate import concept_readout
from cpo_jax.evaluate import drift_probe as drift_probe_lib
from cpo_jax.evaluate import findings
from cpo_jax.evaluate import hosts
from cpo_jax.evaluate import interference
from cpo_jax.evaluate import plots
from cpo_jax.evaluate import scoring
from cpo_jax.models import lora


def write_report(report, workdir):
  """<workdir>/eval/report.json and its plots, written by process 0 only."""
  if jax.process_index() != 0:
    return
  out = paths.path(workdir) / 'eval'
  paths.write_json(out / 'report.json', report, indent=2)
  plots.plot_accuracy(report, out / 'accuracy.png')
  plots.plot_paper_metrics(report, out / 'paper_metrics.png')
  if 'interference' in report:
    plots.plot_robustness(report, out / 'robustness.png')
  if 'concept_readout' in report:
    plots.plot_concept_readout(report, out / 'concept_readout.png')
  metrics = paths.path(workdir) / 'metrics.jsonl'
  if metrics.exists():
    plots.plot_training_curves(metrics, out / 'training_curves.png')


def evaluate_splits(model, cfg, data):
  """{split: classification metrics, skipped records by reason, truncated answers, a few
  generated texts; with eval.text_metrics the report-generation scores of the chains, and on
  records with finding labels (mimic_ccf) the multi-label findings metrics} per eval split."""
  graph, out = data.graph, {}
  scorer = None
  for split in data.eval_splits:
    skips = bad_records.SkipCounter()
    pred = answers.predict_split(  # each host decodes its share; all get every row back
      model,
      functools.partial(data.eval_batches, split),
      blank=data.blank_eval_batch,
      tokenizer=data.processors.tokenizer,
      graph=graph,
      max_new_tokens=data.max_new_tokens,
      skips=skips,
      desc=f'eval {split}',
    )
    if pred.truncated.any():
      logging.warning(
        'eval %s: %d of %d answers did not end within eval.max_new_tokens=%d (counted as '
        'truncated); 0 sizes it to the data.',
        split,
        pred.truncated.sum(),
        len(pred.truncated),
        data.max_new_tokens,
      )
    section = dict(
      answers.classification_metrics(pred.predicted, pred.gold, graph.decisions),
      truncated=int(pred.truncated.sum()),
      skipped=dict(skips.counts),
    )
    source = data.sources[split]
    labelled = len(pred.indices) and 'labels' in source[int(pred.indices[0])]
    # The records again, for their gold texts and finding labels (only when those are scored).
    wanted = len(pred.indices) and (cfg.eval.text_metrics or labelled)
    records = [source[int(i)] for i in pred.indices] if wanted else []
    if cfg.eval.text_metrics and records:
      gold_texts = [eval_batches.gold_completion(source, r) for r in records]
      section['report_generation'] = findings.report_scores(gold_texts, pred.texts)
    if labelled:
      scorer = scorer or scoring.AnswerScorer(model, data.processors, graph)
      scores = findings.finding_scores(  # each host scores its share, as it decoded it
        scorer,
        data.eval_batches(split, **hosts.share(model)),
        dict(zip(pred.indices.tolist(), pred.texts)),
        FINDINGS,
        desc=f'findings {split}',
        blank=data.blank_eval_batch,
      )
      labels = np.stack([np.asarray(r['labels']) for r in records])
      section['findings'] = findings.findings_report(labels, pred.texts, scores, FINDINGS)
    out[split] = dict(section, examples=pred.texts[:3])
  return out


def during_training(cfg, data):
  """`evaluate(model)` for eval.every_steps: decision accuracy (and unparsed answers) on the
  first `eval.every_steps_examples` examples of the first eval split."""
  split = data.eval_splits[0]

  def evaluate(model):
    pred = answers.predict_split(
      model,
      functools.partial(data.eval_batches, split, max_examples=cfg.eval.every_steps_examples),
      blank=data.blank_eval_batch,
      tokenizer=data.processors.tokenizer,
      graph=data.graph,
      max_new_tokens=data.max_new_tokens,
      desc=f'eval {split} (during training)',
    )
    scores = answers.decision_accuracy(pred.predicted, pred.gold)
    return {f'eval/{split}/{k}': scores[k] for k in ('accuracy', 'unparsed')}

  return evaluate


def robustness_sections(model, cfg, data):
  """`interference.<kind>.<severity>` (accuracy under that interference),
  `interference_not_applicable.<thinking kind>.<severity>` (rows that edit could not be scored
  on) and `drift` (answer shift when one concept in the chain is substituted; its own
  `not_applicable` per metric) on `eval.robustness_split`. On real data (pair sources) the
  thinking probes edit each record's own chain (chain_edits.mention_edit). Each host reads,
  decodes and scores its share of the probe split, as for the splits (image_swap excepted:
  its donors come from the whole split, which every host reads)."""
  split = cfg.eval.robustness_split or data.eval_splits[0]
  n = cfg.eval.robustness_max_examples
  batches = lambda **share: data.eval_batches(split, max_examples=n, **share)
  kw = dict(
    processors=data.processors,
    graph=data.graph,
    rng_seed=cfg.seed,
    source=data.sources[split],
    blank=data.blank_eval_batch,
  )
  details = interference.interference_details(
    model, batches, max_new_tokens=data.max_new_tokens, **kw
  )
  return {
    'robustness_split': split,
    'interference': interference.accuracies(details),
    'interference_not_applicable': interference.not_applicable(details),
    'drift': drift_probe_lib.drift_probe(model, batches(**hosts.share(model)), **kw),
  }


def concept_readout_section(model, cfg, data):
  """`concept_readout` (which concept the chain misreads, per nuisance) on the first
  eval.max_examples records of eval.robustness_split; each host scores its share. The
  agrees/disagrees split uses what each nuisance value predicts in `train` (read only when the
  records carry a nuisance: real data has none)."""
  split = cfg.eval.robustness_split or data.eval_splits[0]
  rows = concept_readout.readout_rows(
    model,
    data.eval_batches(split, max_examples=cfg.eval.max_examples, **hosts.share(model)),
    processors=data.processors,
    graph=data.graph,
    blank=data.blank_eval_batch,
  )
  known = any(r['nuisance'] >= 0 for r in rows)
  shortcut = concept_readout.shortcut_map(data.sources.get('train'), data.graph) if known else None
  return {'split': split, **concept_readout.summarize(rows, data.graph, shortcut)}


def run_eval(model, cfg, data, *, stage):
  """The eval report (DESIGN.md contract: splits.<split>.accuracy and n, interference,
  drift.outcome_shift).

  After CPO++ the same model with its adapters off is the SFT model, so the report also
  carries that baseline, measured on the same examples: the method's effect in one file.
  """
  graph = data.graph

  def measure(m):
    out = {'splits': evaluate_splits(m, cfg, data)}
    if cfg.eval.robustness and data.eval_splits:  # none: the user's files have no eval split
      out.update(robustness_sections(m, cfg, data))
    if cfg.eval.concept_readout and data.eval_splits:
      out['concept_readout'] = concept_readout_section(m, cfg, data)
    return out

  report = {
    'domain': cfg.domain,
    'stage': stage,
    'decisions': list(graph.decisions),
    'chance_accuracy': 1.0 / len(graph.decisions),
    **measure(model),
  }
  if stage == 'cpo_plus' and cfg.eval.baseline:
    with lora.adapters_disabled(model):
      report['baseline'] = {'stage': 'sft', **measure(model)}
  return report
