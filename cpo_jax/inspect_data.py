"""`--mode=inspect`: what the configured data would give a run, read without training.

Per split: records and (for pair records) their CPO source, bad records by reason with the first
ids, token lengths (prompt, gold completion, both together against `data.max_len`) and original
image sizes; for the training split, how many thinking and perception pairs the CPO stream would
make; and a sheet of a few rendered pairs (image, rejected image, chosen and rejected text).
Written to <workdir>/inspect/ as inspect.json, lengths.png and examples.png.
"""

from __future__ import annotations

import collections
import io
import textwrap

import matplotlib
import numpy as np
from PIL import Image
import tqdm

from cpo_jax import paths
from cpo_jax.data import bad_records
from cpo_jax.data import eval_batches
from cpo_jax.data import examples
from cpo_jax.data import pairs as pairs_lib
from cpo_jax.data import streams
from cpo_jax.data import thinking_pairs

matplotlib.use('Agg')
from matplotlib import pyplot as plt  # noqa: E402

SOURCE_NAMES = {v: k for k, v in pairs_lib.SOURCE_IDS.items()}
HISTOGRAM_BINS = 10


def _image_size(image) -> tuple[int, int]:
  if isinstance(image, (bytes, np.bytes_)):
    with Image.open(io.BytesIO(image)) as im:  # the header only
      return im.size
  height, width = np.asarray(image).shape[:2]
  return width, height


def _histogram(values):
  if not values:
    return {'counts': [], 'edges': []}
  counts, edges = np.histogram(values, bins=HISTOGRAM_BINS)
  return {'counts': counts.tolist(), 'edges': [round(float(e), 1) for e in edges]}


def inspect_split(source, proc, *, max_len: int, max_examples: int | None = None, name=''):
  """The facts of one split (module doc) plus its raw per-record lengths for the plots."""
  n = len(source) if max_examples is None else min(max_examples, len(source))
  skips, kinds = bad_records.SkipCounter(), collections.Counter()
  prompts, completions, totals, sizes = [], [], [], []
  for i in tqdm.tqdm(range(n), desc=f'inspect {name}', leave=False):
    try:
      rec = source[i] if examples.gives_pairs(source) else examples.read_record(source, i)
      prompt = eval_batches.prompt_ids(source, rec, proc)
      completion = proc.completion_ids(eval_batches.gold_completion(source, rec))
      if proc.tokenizer.unk_token_id in prompt + completion:
        raise bad_records.BadRecordError('unknown_token', rec.get('record_id', i), 'unknown words')
      size = _image_size(rec['image'])
    except bad_records.BadRecordError as e:
      skips.add(e.reason, e.record_id)
      continue
    if examples.gives_pairs(source):
      usable = rec['sample_weight'] > 0
      kinds[SOURCE_NAMES[int(rec['source'])] if usable else 'no_preference'] += 1
    prompts.append(len(prompt))
    completions.append(len(completion))
    totals.append(len(prompt) + len(completion))
    sizes.append(size)
  over = int(sum(t > max_len for t in totals))
  facts = {
    'records': len(source),
    'read': n,
    'usable': len(totals) - over,
    'skipped': dict(skips.counts),
    'skipped_examples': dict(skips.examples),
    'skipped_while_preparing': getattr(source, 'skipped', {}),
    'over_max_len': over,
    'max_len': max_len,
    'prompt_tokens': _histogram(prompts),
    'completion_tokens': _histogram(completions),
    'total_tokens': _histogram(totals),
    'image_sizes': dict(collections.Counter(f'{w}x{h}' for w, h in sizes).most_common(10)),
  }
  if kinds:
    facts['pairs_by_source'] = dict(kinds)
  return facts, totals


def pair_sheet(data, path, count=4):
  """PNG: `count` pairs the CPO stream would make (image, rejected image, both texts)."""
  source, cfg = data.sources['train'], data.cfg
  rng = np.random.default_rng(cfg.seed)
  index = None if examples.gives_pairs(source) else pairs_lib.PairIndex.from_source(source)
  # The shortcut targets; reference-picked ones need the model (shown as random rewrites here).
  thinking = (
    None
    if examples.gives_pairs(source)
    else thinking_pairs.plan_for(
      source,
      data.graph,
      target=cfg.data.thinking_target,
      negative=cfg.data.thinking_negative,
    )
  )
  shown = []
  for i in range(len(source)):
    if len(shown) == count:
      break
    try:
      if examples.gives_pairs(source):
        rec = source[i]
        if rec['sample_weight'] == 0:
          continue
        pair = dict(
          rec,
          chosen_image=rec['image'],
          chosen_completion=rec['chosen'],
          rejected_completion=rec['rejected'],
        )
      else:
        rec = examples.read_record(source, i)
        pair = pairs_lib.make_pair(
          rec,
          i,
          rng,
          graph=data.graph,
          source=source,
          index=index,
          thinking_fraction=cfg.data.thinking_fraction,
          perception_mode=cfg.data.perception_negative,
          thinking_negative=cfg.data.thinking_negative,
          thinking=thinking,
        )
    except bad_records.BadRecordError:
      continue
    shown.append(pair)
  fig, axes = plt.subplots(len(shown), 3, figsize=(14, 3.6 * max(len(shown), 1)), squeeze=False)
  for row, pair in zip(axes, shown):
    for ax, key, title in (
      (row[0], 'chosen_image', 'image'),
      (row[1], 'rejected_image', 'rejected image'),
    ):
      img = pair[key]
      ax.imshow(Image.open(io.BytesIO(img)) if isinstance(img, bytes) else np.asarray(img))
      ax.set_title(title, fontsize=9)
      ax.axis('off')
    kind = SOURCE_NAMES.get(int(pair['source']), '?')
    wrap = lambda t: '\n'.join(textwrap.wrap(pairs_lib.as_text(t), 70)[:8])
    row[2].text(
      0,
      1,
      f'[{kind}]\nCHOSEN:\n{wrap(pair["chosen_completion"])}\n\nREJECTED:\n'
      f'{wrap(pair["rejected_completion"])}',
      va='top',
      fontsize=7,
      family='monospace',
    )
    row[2].axis('off')
  fig.tight_layout()
  paths.save_figure(fig, path, dpi=80)
  plt.close(fig)


def _plot_lengths(totals_by_split, max_len, path):
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for split, totals in totals_by_split.items():
    ax.hist(totals, bins=20, alpha=0.5, label=split)
  ax.axvline(max_len, color='red', ls='--', label=f'data.max_len={max_len}')
  ax.set_xlabel('prompt + gold completion tokens (image tokens included)')
  ax.set_ylabel('records')
  ax.legend(fontsize=8)
  fig.tight_layout()
  paths.save_figure(fig, path, dpi=100)
  plt.close(fig)


def inspect(cfg, workdir):
  """Builds the run's data (tokenizer, sources, the eval check) and writes the inspection."""
  data = streams.RunData(cfg, workdir)
  out = paths.path(workdir) / 'inspect'
  splits, totals = {}, {}
  for split, source in data.sources.items():
    splits[split], totals[split] = inspect_split(source, data.processors, max_len=cfg.data.max_len)
  report = {
    'dataset': cfg.data.name,
    'image_side': data.processors.image_size,
    'image_tokens': data.processors.num_image_tokens(data.grid),
    'eval_splits': data.eval_splits,
    'eval_prompt_len': data.eval_prompt_len,
    'eval_max_new_tokens': data.max_new_tokens,
    'splits': splits,
  }
  if not examples.gives_pairs(data.sources['train']):
    report['pairs_per_cpo_batch'] = {
      'thinking_fraction': cfg.data.thinking_fraction,
      'perception_negative': cfg.data.perception_negative,
    }
  paths.write_json(out / 'inspect.json', report, indent=2)
  _plot_lengths(totals, cfg.data.max_len, out / 'lengths.png')
  pair_sheet(data, out / 'examples.png')
  return report


def summary_lines(report):
  """One line per split for the terminal: the counts a user checks first."""
  lines = []
  for split, r in report['splits'].items():
    t = r['total_tokens']['edges']
    lines.append(
      f"{split}: {r['records']} records, {r['usable']} usable, skipped {r['skipped'] or 0}, "
      f"{r['over_max_len']} over max_len {r['max_len']}, tokens "
      f"{t[0] if t else '-'}..{t[-1] if t else '-'}"
      + (f", pairs {r['pairs_by_source']}" if 'pairs_by_source' in r else '')
    )
  return lines
