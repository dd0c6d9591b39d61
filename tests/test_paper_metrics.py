"""The paper's metrics: hand-computed cases, the libraries' direct calls, and the no-Java path."""

import gc
import json
import logging
import math
import shutil
import threading

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
import pytest
from rouge_score import rouge_scorer
from sklearn import metrics as skm

from cpo_jax.evaluate import paper_metrics as pm

NAMES = ['Cardiomegaly', 'Edema']


def test_multilabel_hand_computed():
  labels = np.array([[1, 0], [1, 0], [0, 0], [1, 0], [0, 0]])
  predicted = np.array([[1, 0], [0, 0], [1, 1], [1, 0], [0, 0]])
  scores = np.array([[0.9, 0.1], [0.2, 0.3], [0.6, 0.7], [0.8, 0.2], [0.1, 0.4]])
  out = pm.multilabel_metrics(labels, predicted, scores, NAMES)
  json.dumps(out, allow_nan=False)  # strict JSON.
  # Cardiomegaly: TP 2, FP 1, FN 1 -> P = R = F1 = 2/3. Edema: no positives, one FP -> 0.
  card, edema = out['per_finding']['Cardiomegaly'], out['per_finding']['Edema']
  assert card['precision'] == pytest.approx(2 / 3)
  assert card['recall'] == pytest.approx(2 / 3)
  assert card['f1'] == pytest.approx(2 / 3)
  assert card['support'] == 3
  assert edema == {'precision': 0.0, 'recall': 0.0, 'f1': 0.0, 'support': 0, 'auc': None}
  # Micro pools TP 2, FP 2, FN 1: P 1/2, R 2/3, F1 4/7. Macro averages the two findings.
  assert out['micro']['precision'] == pytest.approx(1 / 2)
  assert out['micro']['recall'] == pytest.approx(2 / 3)
  assert out['micro']['f1'] == pytest.approx(4 / 7)
  assert out['macro']['precision'] == pytest.approx(1 / 3)
  assert out['macro']['f1'] == pytest.approx(1 / 3)
  # Cardiomegaly AUC: positives {0.9, 0.2, 0.8} vs negatives {0.6, 0.1}: 5 of 6 pairs ordered.
  assert card['auc'] == pytest.approx(5 / 6)
  assert out['macro']['auc'] == pytest.approx(5 / 6)
  assert out['macro']['auc_defined'] == 1
  assert out['n'] == 5


def test_multilabel_matches_sklearn():
  rng = np.random.default_rng(0)
  names = ['a', 'b', 'c', 'd']
  labels = rng.integers(0, 2, (40, 4))
  labels[:, 2] = 1  # one class only: AUC undefined.
  predicted = rng.integers(0, 2, (40, 4))
  scores = rng.random((40, 4))
  out = pm.multilabel_metrics(labels, predicted, scores, names)
  p, r, f, s = skm.precision_recall_fscore_support(labels, predicted, zero_division=0)
  for k, name in enumerate(names):
    got = out['per_finding'][name]
    assert (got['precision'], got['recall'], got['f1'], got['support']) == pytest.approx(
      (p[k], r[k], f[k], s[k])
    )
  for average in ('micro', 'macro'):
    p, r, f, _ = skm.precision_recall_fscore_support(
      labels, predicted, average=average, zero_division=0
    )
    got = out[average]
    assert (got['precision'], got['recall'], got['f1']) == pytest.approx((p, r, f))
  assert out['per_finding']['c']['auc'] is None
  defined = [0, 1, 3]
  for k in defined:
    assert out['per_finding'][names[k]]['auc'] == pytest.approx(
      skm.roc_auc_score(labels[:, k], scores[:, k])
    )
  assert out['macro']['auc'] == pytest.approx(
    skm.roc_auc_score(labels[:, defined], scores[:, defined], average='macro')
  )
  assert out['macro']['auc_defined'] == 3


def test_multilabel_without_scores_and_bad_input():
  labels = np.array([[1, 0], [0, 1]])
  out = pm.multilabel_metrics(labels, labels, None, NAMES)
  assert out['macro']['f1'] == 1.0
  assert out['macro']['auc'] is None and out['macro']['auc_defined'] == 0
  assert all(v['auc'] is None for v in out['per_finding'].values())
  with pytest.raises(ValueError, match='0/1'):
    pm.multilabel_metrics(labels * 2, labels, None, NAMES)
  with pytest.raises(ValueError, match='shape'):
    pm.multilabel_metrics(labels, labels, None, ['only', 'two', 'three'])


def test_top1_accuracy():
  labels = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 0, 0]])
  scores = np.array(
    [[0.9, 0.1, 0.0], [0.7, 0.2, 0.1], [0.1, 0.2, 0.7], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
  )
  out = pm.top1_accuracy(labels, scores, 'abc')
  # Rows 0-2 have one positive; rows 0 and 2 are right.
  assert out == {'n': 3, 'accuracy': pytest.approx(2 / 3)}
  single = labels.sum(1) == 1
  assert out['accuracy'] == pytest.approx(
    skm.top_k_accuracy_score(labels[single].argmax(1), scores[single], k=1, labels=[0, 1, 2])
  )
  assert pm.top1_accuracy(labels[3:], scores[3:], 'abc') == {'n': 0, 'accuracy': None}
  assert pm.top1_accuracy(labels, None, 'abc') == {'n': 3, 'accuracy': None}


def test_tokenize():
  assert pm.tokenize('The Heart, is  NORMAL.\nNo effusion!') == 'the heart is normal no effusion'
  assert pm.tokenize(None) == pm.tokenize('') == ''


@pytest.fixture
def no_java(monkeypatch, tmp_path):
  monkeypatch.setenv('PATH', str(tmp_path))
  assert shutil.which('java') is None


def test_identical_texts_score_one(no_java):
  refs = ['The heart size is normal.', 'No pleural effusion or pneumothorax.']
  hyps = ['the heart size is normal', 'No pleural effusion, or pneumothorax']
  out = pm.report_generation_scores(refs, hyps)
  for k in range(1, 5):
    assert out[f'bleu_{k}'] == pytest.approx(1.0, abs=1e-6)
  assert out['rouge_l'] == pytest.approx(1.0)
  assert out['n'] == 2


def test_hand_computed_bleu_rouge(no_java):
  out = pm.report_generation_scores(['the heart is normal in size'], ['the heart is'])
  # 1-gram precision 1, brevity penalty exp(1 - 6/3).
  assert out['bleu_1'] == pytest.approx(math.exp(-1), abs=1e-6)
  # LCS 3: P 1, R 1/2, F1 2/3.
  assert out['rouge_l'] == pytest.approx(2 / 3)
  # CIDEr-D's IDF comes from the references: a single pair scores 0.
  assert out['cider'] == 0.0


def test_text_scores_match_libraries(no_java):
  refs = ['the heart is normal', 'there is a small left effusion', 'lungs are clear']
  hyps = ['the heart is enlarged', 'small left pleural effusion', 'the lungs are clear']
  out = pm.report_generation_scores(refs, hyps)
  gts = {i: [r] for i, r in enumerate(refs)}
  res = {i: [h] for i, h in enumerate(hyps)}
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  assert [out[f'bleu_{k}'] for k in range(1, 5)] == pytest.approx(bleu)
  assert out['cider'] == pytest.approx(Cider().compute_score(gts, res)[0])
  assert out['cider'] > 0
  rouge = rouge_scorer.RougeScorer(['rougeL'])
  expected = np.mean([rouge.score(r, h)['rougeL'].fmeasure for r, h in zip(refs, hyps)])
  assert out['rouge_l'] == pytest.approx(expected)


def test_no_java_gives_meteor_none_with_warning(no_java, caplog):
  with caplog.at_level(logging.WARNING):
    out = pm.report_generation_scores(['the heart is normal'], ['the heart is normal'])
  assert out['meteor'] is None
  assert 'METEOR NOT COMPUTED' in caplog.text and 'java' in caplog.text
  json.dumps(out, allow_nan=False)


def test_empty_hypothesis_and_empty_corpus(no_java):
  out = pm.report_generation_scores(['the heart is normal', 'no effusion'], ['', None])
  assert out['rouge_l'] == 0.0 and out['cider'] == 0.0
  assert out['bleu_1'] == pytest.approx(0.0, abs=1e-6)
  json.dumps(out, allow_nan=False)
  assert pm.report_generation_scores([], []) == {
    'bleu_1': None,
    'bleu_2': None,
    'bleu_3': None,
    'bleu_4': None,
    'rouge_l': None,
    'meteor': None,
    'cider': None,
    'n': 0,
  }
  with pytest.raises(ValueError, match='hypotheses'):
    pm.report_generation_scores(['a'], [])


def test_failing_meteor_jar_gives_none_without_hanging(monkeypatch, caplog):
  lock_free_at_close = []

  class BrokenMeteor:
    def __init__(self):
      self.lock = threading.Lock()

    def compute_score(self, gts, res):
      self.lock.acquire()  # as pycocoevalcap does, then Java answers nothing.
      return float(''), []

    def __del__(self):  # the real one blocks on the lock; an assert here would be swallowed.
      lock_free_at_close.append(self.lock.acquire(timeout=1))

  monkeypatch.setattr(pm.shutil, 'which', lambda _: '/usr/bin/java')
  monkeypatch.setattr(pm, 'Meteor', BrokenMeteor)
  with caplog.at_level(logging.WARNING):
    out = pm.report_generation_scores(['a b'], ['a b'])
  gc.collect()
  assert out['meteor'] is None
  assert 'METEOR NOT COMPUTED' in caplog.text
  assert lock_free_at_close == [True]


@pytest.mark.skipif(shutil.which('java') is None, reason='METEOR needs a Java runtime')
def test_meteor_with_java(monkeypatch):
  refs = ['The heart is normal.', 'There is a small left effusion.', 'Lungs are clear.']
  hyps = ['the heart is normal', 'small left pleural effusion', '']
  gts = {i: [pm.tokenize(r)] for i, r in enumerate(refs)}
  res = {i: [pm.tokenize(h)] for i, h in enumerate(hyps)}
  scorer = Meteor()  # one Java process (seconds to start) for the direct call and ours.
  expected, per_pair = scorer.compute_score(gts, res)
  monkeypatch.setattr(pm, 'Meteor', lambda: scorer)
  out = pm.report_generation_scores(refs, hyps)
  assert out['meteor'] == pytest.approx(expected)
  assert per_pair[0] == pytest.approx(1.0) and per_pair[2] == 0.0
  assert 0 < out['meteor'] < 1
