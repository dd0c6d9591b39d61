"""Evaluation: decision accuracy / per-class F1 per split, written as eval/report.json + plots.

Answers come from the model's own greedy chain (`<think> ... </think> The decision is X.`),
parsed with the domain's concept graph, so a model that never closes its chain or names no
decision is counted wrong (and counted as `unparsed`), not skipped.
"""
import json
import os

import jax
import matplotlib
import numpy as np
import tqdm

matplotlib.use('Agg')  # files only; no display on servers and TPU VMs.
from matplotlib import pyplot as plt  # noqa: E402

from cpo_jax import generate as generate_lib  # noqa: E402
from cpo_jax.models import lora  # noqa: E402


def classification_metrics(predicted, gold, class_names):
    """Accuracy, per-class precision/recall/F1 and the confusion matrix.

    `predicted` holds class indices or -1 for an answer that names no class (always wrong).
    """
    predicted, gold = np.asarray(predicted), np.asarray(gold)
    k = len(class_names)
    confusion = np.zeros((k, k + 1), np.int64)  # last column: unparsed.
    for p, g in zip(predicted, gold):
        confusion[g, p if p >= 0 else k] += 1
    per_class = {}
    for i, name in enumerate(class_names):
        tp = confusion[i, i]
        fp = confusion[:, i].sum() - tp
        fn = confusion[i].sum() - tp
        precision = tp / max(tp + fp, 1)
        recall = tp / max(tp + fn, 1)
        f1 = 2 * precision * recall / max(precision + recall, 1e-12)
        per_class[name] = {'precision': float(precision), 'recall': float(recall),
                           'f1': float(f1), 'support': int(confusion[i].sum())}
    n = len(gold)
    return {
        'n': int(n),
        'accuracy': float((predicted == gold).mean()) if n else float('nan'),
        'macro_f1': float(np.mean([c['f1'] for c in per_class.values()])),
        'unparsed': int((predicted < 0).sum()),
        'per_class': per_class,
        'confusion': confusion.tolist(),
    }


def predict_decisions(model, batches, *, tokenizer, graph, max_new_tokens, desc='eval'):
    """Greedy-decodes each batch and parses the decision. Returns (pred ids, gold ids, texts)."""
    predicted, gold, texts = [], [], []
    for batch in tqdm.tqdm(batches, desc=desc, unit='batch', leave=False):
        tokens = generate_lib.generate(
            model, batch['input_ids'], batch['attention_mask'], batch['pixel_values'],
            batch['image_grid_thw'], max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.convert_tokens_to_ids('<|im_end|>'),
            pad_token_id=tokenizer.pad_token_id)
        valid = np.asarray(batch['valid'], bool)  # the last batch is padded to a static shape.
        for row, keep, label in zip(np.asarray(jax.device_get(tokens)), valid, batch['decision']):
            if not keep:
                continue
            text = tokenizer.decode(row, skip_special_tokens=True)
            decision = graph.parse_decision(text)
            predicted.append(graph.decision_id(decision) if decision is not None else -1)
            gold.append(int(label))
            texts.append(text)
    return np.array(predicted, np.int64), np.array(gold, np.int64), texts


def write_report(report, workdir):
    out = os.path.join(workdir, 'eval')
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'report.json'), 'w') as f:
        json.dump(report, f, indent=2)
    plot_accuracy(report, os.path.join(out, 'accuracy.png'))
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
    for key in ('rewards/accuracies', 'thinking/rewards/accuracies',
                'perception/rewards/accuracies'):
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
        predicted, gold, texts = predict_decisions(
            model, data.eval_batches(split), tokenizer=data.processors.tokenizer, graph=graph,
            max_new_tokens=cfg.eval.max_new_tokens, desc=f'eval {split}')
        out[split] = dict(classification_metrics(predicted, gold, graph.decisions),
                          examples=texts[:3])
    return out


def run_eval(model, cfg, data, *, stage):
    """The eval report (DESIGN.md contract: splits.<split>.accuracy and n).

    After CPO++ the same model with its adapters off is the SFT model, so the report also
    carries that baseline, measured on the same examples: the method's effect in one file.
    """
    graph = data.graph
    report = {'domain': cfg.domain, 'stage': stage, 'decisions': list(graph.decisions),
              'chance_accuracy': 1.0 / len(graph.decisions),
              'splits': evaluate_splits(model, cfg, data)}
    if stage == 'cpo_plus':
        with lora.adapters_disabled(model):
            report['baseline'] = {'stage': 'sft', 'splits': evaluate_splits(model, cfg, data)}
    return report
