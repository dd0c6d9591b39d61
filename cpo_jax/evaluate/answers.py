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
from cpo_jax.data import bad_records
from cpo_jax.evaluate import hosts


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
  """Greedy-decodes each batch and parses the decision. Every process passes the same batches
  (the robustness probes do); on a mesh each call's rows are split over its data-parallel axes.

  Returns a Predictions of the valid rows, in order: `truncated` marks answers that did not
  end within max_new_tokens (cut, so likely unparsed: the report counts them), `indices` the
  rows' record indices.
  """
  eos = tokenizer.convert_tokens_to_ids('<|im_end|>')
  tables = []
  for batch in tqdm.tqdm(batches, desc=desc, unit='batch', leave=False):
    tokens = _generate(model, batch, tokenizer, eos, max_new_tokens, rows='all')
    tables.append(_row_table(tokens, batch))
  return _parse(tables, tokenizer, graph, eos, record_order=False)


def predict_split(
  model,
  read_shard,
  *,
  blank,
  tokenizer,
  graph,
  max_new_tokens,
  skips=None,
  desc='eval',
):
  """`predict_decisions` of a whole split, data-parallel over the JAX processes.

  Each process reads only its share, `read_shard(shard_index=, shard_count=, skips=)` (eval
  batches of every shard_count-th record, make_eval_batches), and every generate call decodes
  all processes' rows at once, split over the mesh's data-parallel axes. A process that runs
  out first feeds `blank()` (a batch of invalid rows) until all have, so the calls match. The
  rows are gathered on every process and returned in record order (sorted by index), and the
  skipped records summed into `skips`: the same Predictions and counts as one process reading
  the whole split.
  """
  groups = generate_lib.row_groups(generate_lib.mesh_of(model))
  own = bad_records.SkipCounter()
  batches = read_shard(shard_index=groups.index, shard_count=groups.count, skips=own)
  pred = predict_shared(
    model,
    batches,
    blank=blank,
    tokenizer=tokenizer,
    graph=graph,
    max_new_tokens=max_new_tokens,
    desc=desc,
  )
  # Processes of one group read the same rows (and skipped the same records): count each once.
  by_group = {g: c for g, c in hosts.allgather_json([groups.index, dict(own.counts)])}
  if skips is not None:
    for counts in by_group.values():
      skips.counts.update(counts)
  return pred


def predict_shared(model, batches, *, blank, tokenizer, graph, max_new_tokens, desc='eval'):
  """`predict_decisions` of the rows every process holds together: `batches` are this
  process's share (predict_split's, or a probe's perturbed share), decoded in calls that take
  every process's rows at once; a process that runs out feeds `blank()`. The Predictions of
  all rows, on every process, in record order."""
  eos = tokenizer.convert_tokens_to_ids('<|im_end|>')
  tables = []
  for batch in tqdm.tqdm(hosts.lockstep(batches, blank), desc=desc, unit='batch', leave=False):
    tokens = _generate(model, batch, tokenizer, eos, max_new_tokens, rows='process')
    tables.append(_row_table(tokens, batch))
  if tables:  # every process made the same calls: tables of one shape
    tables = [hosts.allgather_rows(np.concatenate(tables))]
  return _parse(tables, tokenizer, graph, eos, record_order=True)


def _generate(model, batch, tokenizer, eos, max_new_tokens, rows):
  valid = np.asarray(batch['valid'], bool)  # filler rows (valid=False) never extend the loop
  return generate_lib.generate(
    model,
    batch['input_ids'],
    batch['attention_mask'],
    batch['pixel_values'],
    batch['image_grid_thw'],
    max_new_tokens=max_new_tokens,
    eos_token_id=eos,
    pad_token_id=tokenizer.pad_token_id,
    active=valid,
    rows=rows,
  )


def _row_table(tokens, batch):
  """int32 [B, 3 + T]: valid, gold decision and record index of each row, then its tokens."""
  meta = [np.asarray(batch[k]).astype(np.int32) for k in ('valid', 'decision', 'index')]
  return np.concatenate([np.stack(meta, 1), np.asarray(jax.device_get(tokens), np.int32)], 1)


def _parse(tables, tokenizer, graph, eos, *, record_order):
  """Predictions of the valid rows of the row tables: in their order, or with `record_order`
  sorted by record index, each record once (replica processes gave the same rows)."""
  table = np.concatenate(tables) if tables else np.zeros((0, 3), np.int32)
  table = table[table[:, 0] == 1]
  if record_order:
    _, first = np.unique(table[:, 2], return_index=True)
    table = table[first]
  predicted, texts = [], []
  for row in table[:, 3:]:
    text = tokenizer.decode(row, skip_special_tokens=True)
    decision = graph.parse_decision(text)
    predicted.append(graph.decision_id(decision) if decision is not None else -1)
    texts.append(text)
  return Predictions(
    np.array(predicted, np.int64),
    table[:, 1].astype(np.int64),
    texts,
    np.array([eos not in row for row in table[:, 3:]], bool),
    table[:, 2].astype(np.int64),
  )
