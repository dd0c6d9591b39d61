"""The paper's evaluation metrics, computed by the standard libraries rather than by hand.

Findings (14 CheXpert labels, multi-label): per-finding and micro/macro precision, recall and
F1 (scikit-learn, zero_division=0), per-finding and macro ROC AUC (scikit-learn), and top-1
accuracy on the rows with exactly one positive finding.

Generated text (reports, driving chains): BLEU-1..4, METEOR and CIDEr from pycocoevalcap (the
coco-caption scorers; its `Cider` is CIDEr-D) and ROUGE-L F-measure from rouge-score.

Tokenisation, the same for every text metric: rouge-score's DefaultTokenizer without stemming,
i.e. lowercase, every run of characters outside [a-z0-9] becomes a space (so punctuation and
non-ASCII characters are dropped: "3.5cm" -> "3 5cm", "don't" -> "don t"). pycocoevalcap's
PTBTokenizer is not used: it needs Java and writes temporary files into the installed package.
The tokens are joined with single spaces for the pycocoevalcap scorers, which split on
whitespace; this also keeps newlines and '|||' out of METEOR's line-based Java protocol.

Aggregation follows each library: BLEU and METEOR are corpus-level, CIDEr-D and ROUGE-L are the
mean of the per-pair scores. CIDEr-D's IDF comes from the references, so a single pair scores 0.
METEOR runs the bundled meteor-1.5.jar (with its bundled paraphrase table) and so needs `java`
on PATH; without it METEOR is None and a warning is logged. Nothing is downloaded at run time.

Every value is a Python float/int or None (never NaN): report.json stays strict JSON.
"""

from __future__ import annotations

import shutil
from typing import Sequence

from absl import logging
import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from rouge_score import rouge_scorer
from rouge_score import tokenizers
from sklearn import metrics as skm

_TOKENIZER = tokenizers.DefaultTokenizer(use_stemmer=False)


def _check_matrix(name, array, names):
  array = np.asarray(array)
  if len(names) < 2:  # scikit-learn reads a single column as binary, not multi-label.
    raise ValueError(f'need at least 2 findings, got {len(names)}')
  if array.ndim != 2 or array.shape[1] != len(names):
    raise ValueError(f'{name} must be [N, {len(names)}], got shape {array.shape}')
  return array


def _binary(name, array, names):
  array = _check_matrix(name, array, names)
  if not np.isin(array, (0, 1)).all():
    raise ValueError(f'{name} must hold only 0/1')
  return array.astype(np.int64)


def multilabel_metrics(labels, predicted, scores, names: Sequence[str]) -> dict:
  """Per-finding and averaged precision/recall/F1/AUC of multi-label predictions.

  Args:
    labels: [N, K] 0/1 ground truth (multi-hot findings).
    predicted: [N, K] 0/1 findings the model predicted.
    scores: [N, K] float per-finding scores (higher = more likely), or None (AUC is then None).
    names: the K finding names.

  Returns:
    {'n', 'per_finding': {name: {precision, recall, f1, support, auc}},
     'micro': {precision, recall, f1}, 'macro': {precision, recall, f1, auc, auc_defined}}.
    A finding's AUC is None when its labels hold a single class; the macro AUC is the mean of
    the defined ones (None if none is) and `auc_defined` says how many there were. Macro P/R/F1
    average all K findings, including those with no positives (which score 0 there).
  """
  names = list(names)
  labels = _binary('labels', labels, names)
  predicted = _binary('predicted', predicted, names)
  if predicted.shape != labels.shape:
    raise ValueError(f'predicted {predicted.shape} and labels {labels.shape} differ')
  if scores is not None:
    scores = _check_matrix('scores', scores, names).astype(np.float64)
    if scores.shape != labels.shape:
      raise ValueError(f'scores {scores.shape} and labels {labels.shape} differ')

  precision, recall, f1, support = skm.precision_recall_fscore_support(
    labels, predicted, average=None, zero_division=0
  )
  aucs = []
  for k in range(len(names)):
    defined = scores is not None and len(np.unique(labels[:, k])) == 2
    aucs.append(float(skm.roc_auc_score(labels[:, k], scores[:, k])) if defined else None)
  defined_aucs = [a for a in aucs if a is not None]

  per_finding = {
    name: {
      'precision': float(precision[k]),
      'recall': float(recall[k]),
      'f1': float(f1[k]),
      'support': int(support[k]),
      'auc': aucs[k],
    }
    for k, name in enumerate(names)
  }
  averages = {}
  for average in ('micro', 'macro'):
    p, r, f, _ = skm.precision_recall_fscore_support(
      labels, predicted, average=average, zero_division=0
    )
    averages[average] = {'precision': float(p), 'recall': float(r), 'f1': float(f)}
  averages['macro']['auc'] = float(np.mean(defined_aucs)) if defined_aucs else None
  averages['macro']['auc_defined'] = len(defined_aucs)
  return {'n': int(labels.shape[0]), 'per_finding': per_finding, **averages}


def top1_accuracy(labels, scores, names: Sequence[str]) -> dict:
  """Top-1 accuracy on the rows of `labels` with exactly one positive finding.

  A row counts as right when argmax(scores) is its finding (ties go to the first index, as in
  np.argmax). Returns {'n': size of that subset, 'accuracy': float, or None if the subset is
  empty or scores is None}.
  """
  names = list(names)
  labels = _binary('labels', labels, names)
  single = labels.sum(axis=1) == 1
  n = int(single.sum())
  if scores is None or n == 0:
    return {'n': n, 'accuracy': None}
  scores = _check_matrix('scores', scores, names)
  if scores.shape != labels.shape:
    raise ValueError(f'scores {scores.shape} and labels {labels.shape} differ')
  right = np.argmax(scores[single], axis=1) == np.argmax(labels[single], axis=1)
  return {'n': n, 'accuracy': float(right.mean())}


def tokenize(text: str | None) -> str:
  """The text as the metrics see it: rouge-score's tokens joined by single spaces."""
  return ' '.join(_TOKENIZER.tokenize(text or ''))


def _meteor(gts, res):
  """METEOR via the bundled Java jar, or None (with a warning) when Java is missing or fails."""
  if shutil.which('java') is None:
    logging.warning(
      'METEOR NOT COMPUTED: no `java` on PATH (pycocoevalcap runs meteor-1.5.jar). '
      'Reporting meteor=None; install a Java runtime (e.g. apt-get install default-jre-headless).'
    )
    return None
  scorer = None
  try:
    scorer = Meteor()
    score, _ = scorer.compute_score(gts, res)
    return float(score)
  except (OSError, ValueError) as e:  # Java died or answered garbage: report None, not 0.
    # repr(e), not e: a kept log record must not keep the traceback (and the process) alive.
    logging.warning('METEOR NOT COMPUTED: the METEOR jar failed (%s); meteor=None.', repr(e))
    return None
  finally:
    if scorer is not None:
      # compute_score leaves its lock held when it raises, and Meteor.__del__ takes that lock:
      # release it so closing the Java process (here, via __del__) cannot hang.
      if scorer.lock.locked():
        scorer.lock.release()
      del scorer


def report_generation_scores(references: Sequence[str], hypotheses: Sequence[str]) -> dict:
  """BLEU-1..4, ROUGE-L, METEOR and CIDEr-D of `hypotheses` against one reference each.

  Args:
    references: the gold texts (reports or chains).
    hypotheses: the generated texts, same length; empty (or None) ones score as empty text.

  Returns:
    {'bleu_1'..'bleu_4', 'rouge_l', 'meteor', 'cider', 'n'}; every score is None when n == 0,
    and meteor is None when Java is unavailable (see the module docstring).
  """
  if len(references) != len(hypotheses):
    raise ValueError(f'{len(references)} references but {len(hypotheses)} hypotheses')
  n = len(references)
  keys = ('bleu_1', 'bleu_2', 'bleu_3', 'bleu_4', 'rouge_l', 'meteor', 'cider')
  if n == 0:
    return {**dict.fromkeys(keys), 'n': 0}
  gts = {i: [tokenize(r)] for i, r in enumerate(references)}
  res = {i: [tokenize(h)] for i, h in enumerate(hypotheses)}

  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  cider, _ = Cider().compute_score(gts, res)
  rouge = rouge_scorer.RougeScorer(['rougeL'], tokenizer=_TOKENIZER)
  # The texts are already tokenised; re-tokenising them with the same tokenizer is a no-op.
  rouge_l = [rouge.score(gts[i][0], res[i][0])['rougeL'].fmeasure for i in range(n)]
  return {
    **{f'bleu_{k + 1}': float(b) for k, b in enumerate(bleu)},
    'rouge_l': float(np.mean(rouge_l)),
    'meteor': _meteor(gts, res),
    'cider': float(cider),
    'n': n,
  }
