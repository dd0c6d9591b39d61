"""One path layer for every file cpo_jax reads or writes: local disks and gs:// (etils.epath).

Without TensorFlow, epath reaches Cloud Storage through fsspec's gcsfs. What Cloud Storage lacks
is handled here once: no append (a file is rewritten whole), no empty directories (mkdir is a
no-op there), writes visible only on close, and libraries that need a local directory (the
ArrayRecord writer behind tfds preparation, transformers' save/from_pretrained) work in a local
temporary directory that is uploaded or downloaded whole. Orbax takes the epath.Path itself and
writes checkpoints to the bucket directly.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from typing import Callable
from typing import Iterator

from etils import epath


def is_remote(p) -> bool:
  return '://' in os.fspath(p)


def path(p) -> epath.Path:
  """An epath.Path: local paths made absolute (Orbax wants absolute ones), URLs kept as they are
  (os.path.abspath('gs://b/run') would make '<cwd>/gs:/b/run')."""
  s = os.fspath(p)
  return epath.Path(s if is_remote(s) else os.path.abspath(s))


def join(p, *parts) -> str:
  """The string form of path(p) / parts (for APIs and messages that take strings)."""
  return os.fspath(path(p).joinpath(*parts))


def makedirs(p) -> epath.Path:
  out = path(p)
  out.mkdir(parents=True, exist_ok=True)  # a no-op on gs://, where prefixes need no creating
  return out


def write_text(p, text: str) -> None:
  target = path(p)
  target.parent.mkdir(parents=True, exist_ok=True)
  target.write_text(text)


def write_bytes_whole(p, data: bytes) -> None:
  """Whole or absent, never half-written: a Cloud Storage object appears on close; a local file
  is written aside and renamed."""
  target = path(p)
  target.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(target):
    target.write_bytes(data)
    return
  tmp = target.with_name(target.name + '.tmp')
  tmp.write_bytes(data)
  os.replace(tmp, target)


def write_json(p, obj, **kwargs) -> None:
  write_text(p, json.dumps(obj, **kwargs))


def save_figure(fig, p, **kwargs) -> None:
  """matplotlib figure -> PNG at p (local or gs://)."""
  buf = io.BytesIO()
  fig.savefig(buf, format='png', **kwargs)
  target = path(p)
  target.parent.mkdir(parents=True, exist_ok=True)
  target.write_bytes(buf.getvalue())


def upload_tree(local_dir, remote_dir, last: tuple[str, ...] = ()) -> None:
  """Copies a local directory tree to remote_dir, the files named in `last` after the others
  (a reader that checks for them then sees a complete directory)."""
  files = []
  for root, _, names in os.walk(local_dir):
    files += [os.path.join(root, n) for n in names]
  files.sort(key=lambda f: os.path.basename(f) in last)
  for f in files:
    target = path(remote_dir) / os.path.relpath(f, local_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    epath.Path(f).copy(target, overwrite=True)


def download_files(remote_dir, local_dir, wanted: Callable[[str], bool]) -> None:
  """Copies the files directly under remote_dir whose name is `wanted` into local_dir."""
  source = path(remote_dir)
  if not source.is_dir():
    return
  for f in source.iterdir():
    if wanted(f.name) and not f.is_dir():
      f.copy(epath.Path(local_dir) / f.name, overwrite=True)


def small_files(name: str) -> bool:
  """Everything but weights (configs, tokenizer and processor files)."""
  return not name.endswith(('.safetensors', '.bin', '.pt', '.pth', '.ckpt', '.msgpack'))


@contextlib.contextmanager
def local_directory(
  p, *, read: Callable[[str], bool] | None = None, write: bool = False
) -> Iterator[str]:
  """A local directory standing for p: p itself when it is local; otherwise a temporary one
  holding the files of p that `read` wants (downloaded), uploaded back whole on exit when
  `write`."""
  if not is_remote(p):
    yield os.fspath(path(p))
    return
  with tempfile.TemporaryDirectory(prefix='cpo_jax_') as tmp:
    if read is not None:
      download_files(p, tmp, read)
    yield tmp
    if write:
      upload_tree(tmp, p)
