"""Data: synthetic renderers, TFDS builders, pairs, tokenizer, and the Grain pipeline.

The pipeline, in the order data flows: `sources` (make_source: a split as random-access
records) -> `examples` (one record -> one SFT row or pair row, via `pairs` and `processors`)
-> `packing` (static-shape rows, length buckets) -> `datasets` (SFT and CPO++ Grain streams)
and `eval_batches` (eval and drift-probe batches); `streams.RunData` builds them for a run.
Submodules are imported lazily by their users so that reading data does not pull in
transformers or tensorflow_datasets.
"""
