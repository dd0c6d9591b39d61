"""The data side of one run: processors, sources and the three streams (SFT, CPO++, eval).

Built once from the config; the training loop asks it for fresh Grain iterators (whose state
goes into the checkpoints) and the evaluator for eval batches per split. This process reads
only its own shard of the training data (`jax.process_index()` of `jax.process_count()`);
every host evaluates the same batches.
"""

import functools
import os

from absl import logging
import jax
import numpy as np

from cpo_jax.data import bad_records
from cpo_jax.data import datasets
from cpo_jax.data import eval_batches
from cpo_jax.data import examples
from cpo_jax.data import packing
from cpo_jax.data import processors
from cpo_jax.data import sources
from cpo_jax.knowledge import load_graph

DATASETS = ('synth_drive', 'synth_cxr', 'swift_jsonl', 'mimic_ccf', 'codalm')


class RunData:
  def __init__(self, cfg, workdir):
    self.cfg = cfg
    name = cfg.data.name
    if name not in DATASETS:
      raise ValueError(f'config.data.name={name!r} is not available; known: {DATASETS}.')
    self.graph = load_graph(cfg.domain)
    data_dir = cfg.data.data_dir or os.path.join(workdir, 'data')
    # A Hugging Face checkpoint brings its own tokenizer; synthetic runs build one.
    tokenizer_dir = cfg.model.init_from or os.path.join(data_dir, 'tokenizer')
    self.processors = processors.make_processors(
      tokenizer_dir=tokenizer_dir, image_size=cfg.data.image_size
    )
    # The dataset's own eval splits unless the config names some; a split the dataset offers
    # but the user's files lack is skipped with a note, one the config asks for is an error.
    self.eval_splits = [s for s in (cfg.eval.splits or sources.EVAL_SPLITS[name]).split(',') if s]
    if name in ('swift_jsonl', 'mimic_ccf', 'codalm'):  # the user's files under manual_dir.
      make = functools.partial(
        sources.make_source,
        name,
        data_dir=cfg.data.manual_dir,
        on_bad_record=cfg.data.on_bad_record,
      )
      self.sources = {'train': make('train')}
      for split in self.eval_splits:
        try:
          self.sources[split] = make(split)
        except (FileNotFoundError, ValueError) as e:
          if cfg.eval.splits:
            raise
          logging.warning('eval split %r skipped: %s', split, e)
      self.eval_splits = [s for s in self.eval_splits if s in self.sources]
    else:
      self.sources = {
        split: sources.make_source(
          name,
          split,
          num_examples=n,
          seed=cfg.seed,
          data_dir=data_dir,
          shortcut_agreement=cfg.data.spurious_correlation,
        )
        for split, n in cfg.data.num_examples.items()
      }
    self.skips = bad_records.SkipCounter()
    self.shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
    first = eval_batches.make_eval_batches(
      self.sources[(self.eval_splits or ['train'])[0]],
      self.processors,
      batch_size=1,
      max_prompt_len=cfg.eval.max_prompt_len,
    )
    self.grid = np.asarray(next(first)['image_grid_thw'])[0]  # [3]: (t, h, w) patches.
    self.length_buckets = self._length_buckets()
    # Grouped pairs let the step encode a thinking pair's image once; pairs given by the
    # records (swift_jsonl, mimic_ccf, codalm) come in their own order.
    grouped = cfg.data.pair_layout == 'grouped' and not examples.gives_pairs(self.sources['train'])
    if cfg.data.pair_layout not in ('grouped', 'mixed'):
      raise ValueError(f"data.pair_layout={cfg.data.pair_layout!r}; expected 'grouped' or 'mixed'.")
    self.pair_layout = (
      datasets.pair_layout_for(cfg.data.thinking_fraction, self._per_host(cfg.cpo.batch_size))
      if grouped
      else None
    )

  def _length_buckets(self):
    c = self.cfg
    buckets = packing.parse_length_buckets(c.data.length_buckets, c.data.max_len)
    n_image = self.processors.num_image_tokens(self.grid)
    if buckets[0] <= n_image:
      raise ValueError(
        f'data.length_buckets={c.data.length_buckets!r}: bucket {buckets[0]} '
        f'cannot hold the {n_image} image tokens of a row; use longer buckets.'
      )
    return buckets

  def _per_host(self, batch_size):
    if batch_size % jax.process_count():
      raise ValueError(f'batch size {batch_size} does not split over {jax.process_count()} hosts.')
    return batch_size // jax.process_count()

  def sft_batches(self):
    c = self.cfg
    return datasets.make_sft_iterator(
      self.sources['train'],
      self.processors,
      batch_size=self._per_host(c.sft.batch_size),
      max_len=c.data.max_len,
      seed=c.seed,
      on_bad_record=c.data.on_bad_record,
      max_skipped_share=c.data.max_skipped_share,
      skips=self.skips,
      worker_count=c.data.worker_count,
      length_buckets=self.length_buckets,
      **self.shard,
    )

  def cpo_batches(self):
    c = self.cfg
    return datasets.make_cpo_iterator(
      self.sources['train'],
      self.processors,
      batch_size=self._per_host(c.cpo.batch_size),
      max_len=c.data.max_len,
      seed=c.seed + 1,
      graph=self.graph,
      thinking_fraction=c.data.thinking_fraction,
      perception_mode=c.data.perception_negative,
      on_bad_record=c.data.on_bad_record,
      max_skipped_share=c.data.max_skipped_share,
      skips=self.skips,
      worker_count=c.data.worker_count,
      length_buckets=self.length_buckets,
      pair_layout=self.pair_layout,
      **self.shard,
    )

  def eval_batches(self, split, max_examples=None):
    c = self.cfg
    return eval_batches.make_eval_batches(
      self.sources[split],
      self.processors,
      batch_size=c.eval.batch_size,
      max_prompt_len=c.eval.max_prompt_len,
      max_examples=max_examples or c.eval.max_examples,
      graph=self.graph,
    )

  def log_skips(self):
    if self.skips.total():
      logging.warning(
        'skipped records: %s (examples: %s)', dict(self.skips.counts), dict(self.skips.examples)
      )
