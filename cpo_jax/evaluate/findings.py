"""The paper's real-data scores of generated answers: findings and report text.

Findings (MIMIC: records carry the 14 CheXpert `labels`): the predicted set is every finding the
answer part names ('The disease of this patient is A, B.'; matched case-insensitively as whole
words). Scoring rule for AUC: a finding's score on an example is the log-probability the model
gives to naming it right after its own generated chain, teacher-forced: log p(finding tokens |
image, prompt, the generated '<think> ... </think>', 'The disease of this patient is'), summed
over the finding's tokens. AUC compares one finding across examples, so the names' lengths do
not bias it.

Report text: the chain inside '<think> ... </think>' (the whole text when there is none) of the
generated answer against the gold answer's, scored by `paper_metrics.report_generation_scores`.
"""

from __future__ import annotations

import re
from typing import Callable
from typing import Mapping
from typing import Sequence

import numpy as np
import tqdm

from cpo_jax.evaluate import hosts
from cpo_jax.evaluate import paper_metrics
from cpo_jax.evaluate.scoring import AnswerScorer
from cpo_jax.evaluate.scoring import encode_text
from cpo_jax.knowledge.graph import THINK_CLOSE
from cpo_jax.knowledge.graph import THINK_OPEN


def chain_text(text: str) -> str:
  """The reasoning of an answer: inside the think tags, or all of it without them."""
  body = text.split(THINK_OPEN, 1)[-1]
  return body.split(THINK_CLOSE, 1)[0].strip()


def answer_part(text: str) -> str:
  """After '</think>'; nothing for a chain that never closed (a cut answer names nothing)."""
  if THINK_OPEN in text and THINK_CLOSE not in text:
    return ''
  return text.split(THINK_CLOSE)[-1]


def named_findings(text: str, names: Sequence[str]) -> np.ndarray:
  """[K] 0/1: the findings the answer part names."""
  answer = answer_part(text).lower()
  return np.array(
    [bool(re.search(rf'\b{re.escape(n.lower())}\b', answer)) for n in names], np.int32
  )


def thought(text: str) -> str:
  """The generated '<think> ... </think>' the finding scores are read after."""
  return f'{THINK_OPEN} {chain_text(text)} {THINK_CLOSE}'


def finding_scores(
  scorer: AnswerScorer,
  batches,
  texts: Mapping[int, str],
  names: Sequence[str],
  desc='findings',
  blank: Callable[[], dict] | None = None,
):
  """[N, K] the AUC scores above, for the valid rows of `batches` in record order (`texts`:
  the generated answer of each of those rows, by record index). With `blank`, `batches` are
  this process's share (as answers.predict_split reads it): a process that runs out feeds
  `blank()` until all have, and the rows are gathered on every process."""
  sequences = [encode_text(scorer.tokenizer, f' {n}') for n in names]
  if blank is not None:
    batches = hosts.lockstep(batches, blank)
  rows = []
  for batch in tqdm.tqdm(batches, desc=desc, unit='batch', leave=False):
    valid = np.asarray(batch['valid'], bool)
    index = np.asarray(batch['index'])
    chains = [thought(texts[int(i)]) if keep else '' for i, keep in zip(index, valid)]
    logps = scorer.sequence_logps(batch, chains, scorer.encode(batch), sequences)
    rows += [{'index': int(index[i]), 'scores': logps[i].tolist()} for i in np.flatnonzero(valid)]
  rows = hosts.rows_by_index(rows, gather=blank is not None)
  if [r['index'] for r in rows] != sorted(texts):
    raise ValueError(
      f'{desc}: scored the rows {[r["index"] for r in rows][:10]}... but the answers are of '
      f'{sorted(texts)[:10]}...: the batches must be those the answers were generated for'
    )
  return np.asarray([r['scores'] for r in rows], np.float64).reshape(len(rows), len(names))


def report_scores(gold_texts: Sequence[str], generated: Sequence[str]) -> dict:
  return paper_metrics.report_generation_scores(
    [chain_text(t) for t in gold_texts], [chain_text(t) for t in generated]
  )


def findings_report(labels, generated, scores, names: Sequence[str]) -> dict:
  """Multi-label P/R/F1 and AUC over the findings, and top-1 on the single-finding rows."""
  predicted = np.stack([named_findings(t, names) for t in generated])
  return {
    **paper_metrics.multilabel_metrics(labels, predicted, scores, names),
    'top1_single_finding': paper_metrics.top1_accuracy(labels, scores, names),
    'auc_scoring': 'log p(finding | own chain, answer prefix), teacher-forced',
  }
