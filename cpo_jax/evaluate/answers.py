"""Answers: greedy-decode a batch, parse the decision, and score decisions against gold.

Answers come from the model's own greedy chain (`<think> ... </think> The decision is X.`),
parsed with the domain's concept graph, so a model that never closes its chain or names no
decision is counted wrong (and counted as `unparsed`), not skipped.
"""

from typing import NamedTuple

import jax
import numpy as np
import tqdm

from cpo_jax import generate as generate_lib


def decision_accuracy(predicted, gold):
  """Accuracy over the labelled rows (gold >= 0) only: an unlabelled row (no single gold
  decision, e.g. a MIMIC study with several findings) is counted apart, never scored; an
  unparsed answer (-1) is always wrong. Accuracy is None (strict JSON) without labelled rows."""
  predicted, gold = np.asarray(predicted), np.asarray(gold)
  labelled = gold >= 0
  n = int(labelled.sum())
  return {
    'accuracy': float((predicted[labelled] == gold[labelled]).mean()) if n else None,
    'n': n,
    'unparsed': int((predicted[labelled] < 0).sum()),
    'unlabelled': int((~labelled).sum()),
  }


def classification_metrics(predicted, gold, class_names):
  """`decision_accuracy` plus per-class precision/recall/F1 and the confusion matrix, all over
  the labelled rows. `predicted` holds class indices or -1 for an answer that names no class."""
  predicted, gold = np.asarray(predicted), np.asarray(gold)
  head = decision_accuracy(predicted, gold)
  labelled = gold >= 0
  k = len(class_names)
  confusion = np.zeros((k, k + 1), np.int64)  # last column: unparsed.
  for p, g in zip(predicted[labelled], gold[labelled]):
    confusion[g, p if p >= 0 else k] += 1
  per_class = {}
  for i, name in enumerate(class_names):
    tp = confusion[i, i]
    fp = confusion[:, i].sum() - tp
    fn = confusion[i].sum() - tp
    precision = tp / max(tp + fp, 1)
    recall = tp / max(tp + fn, 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    per_class[name] = {
      'precision': float(precision),
      'recall': float(recall),
      'f1': float(f1),
      'support': int(confusion[i].sum()),
    }
  return {
    **head,
    'macro_f1': float(np.mean([c['f1'] for c in per_class.values()])) if head['n'] else None,
    'per_class': per_class,
    'confusion': confusion.tolist(),
  }


class Predictions(NamedTuple):
  predicted: np.ndarray  # [N] decision ids, -1 = unparsed
  gold: np.ndarray  # [N] gold decision ids, -1 = unlabelled
  texts: list[str]  # the generated answers
  truncated: np.ndarray  # [N] bool: no end within max_new_tokens
  indices: np.ndarray  # [N] record index in the split


def predict_decisions(model, batches, *, tokenizer, graph, max_new_tokens, desc='eval'):
  """Greedy-decodes each batch and parses the decision.

  Returns a Predictions of the valid rows, in order: `truncated` marks answers that did not
  end within max_new_tokens (cut, so likely unparsed: the report counts them), `indices` the
  rows' record indices.
  """
  predicted, gold, texts, truncated, indices = [], [], [], [], []
  eos = tokenizer.convert_tokens_to_ids('<|im_end|>')
  for batch in tqdm.tqdm(batches, desc=desc, unit='batch', leave=False):
    tokens = generate_lib.generate(
      model,
      batch['input_ids'],
      batch['attention_mask'],
      batch['pixel_values'],
      batch['image_grid_thw'],
      max_new_tokens=max_new_tokens,
      eos_token_id=eos,
      pad_token_id=tokenizer.pad_token_id,
    )
    valid = np.asarray(batch['valid'], bool)  # the last batch is padded to a static shape.
    rows = zip(np.asarray(jax.device_get(tokens)), valid, batch['decision'], batch['index'])
    for row, keep, label, index in rows:
      if not keep:
        continue
      indices.append(int(index))
      text = tokenizer.decode(row, skip_special_tokens=True)
      decision = graph.parse_decision(text)
      predicted.append(graph.decision_id(decision) if decision is not None else -1)
      gold.append(int(label))
      texts.append(text)
      truncated.append(eos not in row)
  return Predictions(
    np.array(predicted, np.int64),
    np.array(gold, np.int64),
    texts,
    np.array(truncated, bool),
    np.array(indices, np.int64),
  )
