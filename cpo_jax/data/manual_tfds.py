"""TFDS builders over data a user brings (`data.manual_dir`): what mimic_ccf and codalm share.

Each builder prepares ArrayRecord files once (no TensorFlow: text and image bytes are stored as
object tensors), has one config per `data.on_bad_record` policy, and leaves beside the files a
JSON report of the records it skipped and `thumbnails.<split>.npy`, every example's
`pairs.thumbnail` (also a feature of the files), so the `hard` perception-negative index is built
without decoding an image again. Version 1.1.0 added the thumbnails: files prepared at 1.0.0 are
left alone and prepared again once under 1.1.0 (delete the 1.0.0 folder).
"""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import tensorflow_datasets as tfds

from cpo_jax.data.bad_records import TooManySkipsError
from cpo_jax.data.pairs import THUMB


def text():
  """A str/bytes feature stored as is (no TF decoding)."""
  return tfds.features.Tensor(shape=(), dtype=np.object_)


def thumbnail_feature():
  return tfds.features.Tensor(shape=(THUMB, THUMB, 3), dtype=np.uint8)


def as_str(x) -> str:
  return x.decode("utf-8") if isinstance(x, (bytes, np.bytes_)) else str(x)


with tfds.core.registered.skip_registration():

  class ManualBuilder(tfds.core.GeneratorBasedBuilder):
    """Config name = the bad-record policy; `_split_generators` sets `self.policy` and
    `self.per_split` (split -> list of example dicts, each with its `thumbnail`) and hands each
    split's list to `_generate_examples`."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
      "1.0.0": "Initial release.",
      "1.1.0": "A thumbnail per example (hard perception negatives).",
    }
    BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name=p, description=f"on_bad_record={p}") for p in ("raise", "skip")
    ]

    def _generate_examples(self, exs):
      for i, ex in enumerate(exs):
        yield i, dict(ex, index=i)


def prepare_manual(
  builder_cls, manual_dir: str, prepared_dir: str | None, on_bad_record: str, sidecar
):
  """download_and_prepare once from manual_dir; the skip report (+ which host and process
  prepared the files, + `sidecar(builder)`, a dict of extra per-split facts) is saved as JSON
  beside the files, written last: it marks a finished preparation. Returns (builder, report).
  Several processes: sources.make_source lets process 0 prepare first."""
  prepared_dir = prepared_dir or os.path.join(manual_dir, "_tfds")
  builder = builder_cls(config=on_bad_record, data_dir=prepared_dir, file_format="array_record")
  report_path = os.path.join(builder.data_dir, "cpo_jax_report.json")
  if not os.path.exists(report_path):
    # files without a report are from an interrupted preparation: generate them again
    builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir, download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
      ),
    )
    for split, exs in builder.per_split.items():
      if exs:
        np.save(_thumbnails_path(builder, split), np.stack([e["thumbnail"] for e in exs]))
    report = {
      "skipped": dict(builder.policy.counts),
      "skipped_examples": dict(builder.policy.examples),
      "prepared_by": {"host": socket.gethostname(), "pid": os.getpid()},
      **sidecar(builder),
    }
    with open(report_path, "w") as f:
      json.dump(report, f)
  with open(report_path) as f:
    return builder, json.load(f)


def missing_split_error(dataset: str, split: str, builder, report) -> ValueError:
  """The error for a split the prepared files lack. When preparing skipped records, it may be
  that all of its records were bad: stop with the counts by reason and the first records (a
  TooManySkipsError, never taken for an optional split the user's files do not have)."""
  where = (
    f"{dataset} has no usable record in split {split!r} (prepared: {sorted(builder.info.splits)})"
  )
  if report["skipped"]:
    return TooManySkipsError(
      f"{where}; preparing the files skipped {sum(report['skipped'].values())} records: "
      f"{report['skipped']}; first records: {report['skipped_examples']}. Fix the files, or "
      "prepare with data.on_bad_record='raise' to see the first error in full."
    )
  return ValueError(where)


def _thumbnails_path(builder, split: str) -> str:
  return os.path.join(builder.data_dir, f"thumbnails.{split}.npy")


def load_thumbnails(builder, split: str) -> np.ndarray:
  """[N, THUMB, THUMB, 3] uint8, record order of the split."""
  return np.load(_thumbnails_path(builder, split), allow_pickle=False)
