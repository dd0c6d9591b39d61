"""TFDS builders over data a user brings (`data.manual_dir`): what mimic_ccf and codalm share.

Each builder prepares ArrayRecord files once (no TensorFlow: text and image bytes are stored as
object tensors), has one config per `data.on_bad_record` policy, and leaves a JSON report of
the records it skipped beside the files.
"""
from __future__ import annotations

import json
import os

import numpy as np
import tensorflow_datasets as tfds


def text():
  """A str/bytes feature stored as is (no TF decoding)."""
  return tfds.features.Tensor(shape=(), dtype=np.object_)


def as_str(x) -> str:
  return x.decode("utf-8") if isinstance(x, (bytes, np.bytes_)) else str(x)


with tfds.core.registered.skip_registration():

  class ManualBuilder(tfds.core.GeneratorBasedBuilder):
    """Config name = the bad-record policy; `_split_generators` sets `self.policy` and hands
    each split's list of example dicts to `_generate_examples`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=p, description=f"on_bad_record={p}") for p in ("raise", "skip")]

    def _generate_examples(self, exs):
      for i, ex in enumerate(exs):
        yield i, dict(ex, index=i)


def prepare_manual(builder_cls, manual_dir: str, prepared_dir: str | None, on_bad_record: str, sidecar):
  """download_and_prepare once from manual_dir; the skip report (+ `sidecar(builder)`, a dict of
  extra per-split facts) is saved as JSON beside the files. Returns (builder, report)."""
  prepared_dir = prepared_dir or os.path.join(manual_dir, "_tfds")
  builder = builder_cls(config=on_bad_record, data_dir=prepared_dir, file_format="array_record")
  report_path = os.path.join(builder.data_dir, "cpo_jax_report.json")
  if not os.path.exists(report_path):
    builder.download_and_prepare(file_format="array_record",
                                 download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    report = {"skipped": dict(builder.policy.counts), "skipped_examples": dict(builder.policy.examples),
              **sidecar(builder)}
    with open(report_path, "w") as f:
      json.dump(report, f)
  with open(report_path) as f:
    return builder, json.load(f)
