"""Two real JAX processes (jax.distributed on localhost, CPU) open the same dataset (user data:
codalm; the synthetic TFDS files of a data_dir: synth_drive): process 0 prepares the TFDS files
while the other waits, then both read the same records.

The worker is this file run as a script (see the bottom)."""

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest

ANSWERS = [
  "The traffic light at the intersection is red, so the ego car should come to a stop.",
  "Slow down for the truck ahead in the same lane.",
]


def _write_codalm(root, n=4, bad=False):
  (root / "val" / "images").mkdir(parents=True)
  (root / "CODA-LM" / "Train").mkdir(parents=True)
  for k in range(n):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(k).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(
      buf, format="JPEG"
    )
    (root / "val" / "images" / f"{k:04d}.jpg").write_bytes(buf.getvalue())
    ann = {
      "general_perception": {
        "description and explanation": f"Scene {k}: a truck ahead in the same lane."
      },
      "region_perception": {},
      "driving_suggestion": ANSWERS[k % 2],
    }
    if bad and k == 2:
      del ann["driving_suggestion"]
    (root / "CODA-LM" / "Train" / f"val_{k:04d}.json").write_text(json.dumps(ann))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_two(data_dir, name="codalm", on_bad_record="raise"):
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device per process
  env["JAX_PLATFORMS"] = "cpu"
  procs = [
    subprocess.Popen(
      [sys.executable, __file__, name, str(data_dir), on_bad_record, str(port), str(i)],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=env,
    )
    for i in range(2)
  ]
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=90)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert lines, err[-3000:]
    outs.append(json.loads(lines[-1]))
  return outs


@pytest.mark.parametrize("name,n", [("codalm", 12), ("synth_drive", 8)])
def test_process_0_prepares_the_others_wait_then_read_the_same_records(tmp_path, name, n):
  if name == "codalm":
    _write_codalm(tmp_path)  # 4 x (general, suggestion) rows + 4 perception rows
  t0 = time.time()
  p0, p1 = _run_two(tmp_path, name)
  # exactly one process generated the files (TFDS logs each generation)
  assert p0["error"] is None and p1["error"] is None
  assert (p0["generated"], p1["generated"]) == (1, 0)
  assert p0["rows"] == p1["rows"] and p0["n"] == p1["n"] == n
  if name == "codalm":  # the report names its writer
    assert p0["prepared_by"] == p1["prepared_by"] == p0["pid"] != p1["pid"]
  # nothing under the prepared dir changed after process 0 had finished and process 1 had opened it
  assert p0["files_after_prepare"] == p0["files_at_end"] and p0["files_at_end"]
  print(f"{name}: two processes, prepare + read: {time.time() - t0:.1f}s")


def test_a_failure_on_process_0_stops_every_process(tmp_path):
  _write_codalm(tmp_path, bad=True)
  p0, p1 = _run_two(tmp_path)
  assert p0["error"].startswith("BadRecordError") and "driving_suggestion" in p0["error"]
  assert p1["error"].startswith("RuntimeError") and "process 0 failed to prepare" in p1["error"]
  prepared = tmp_path / "_tfds" / "codalm" / "raise_original" / "2.0.0"
  assert not (prepared / "cpo_jax_report.json").exists()


def _files(root):
  return sorted(
    (os.path.relpath(os.path.join(d, f), root), os.stat(os.path.join(d, f)).st_mtime_ns)
    for d, _, fs in os.walk(root)
    for f in fs
  )


def _worker(name, data_dir, on_bad_record, port, process_id):
  import logging

  from absl import logging as absl_logging

  generated = []  # TFDS's own log line, once per generation of a dataset

  class _Seen(logging.Handler):
    def emit(self, record):
      if record.getMessage().startswith("Generating dataset"):
        generated.append(record.getMessage())

  absl_logging.set_verbosity("info")
  logging.getLogger("absl").addHandler(_Seen())
  import jax

  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=2,
    process_id=process_id,
    initialization_timeout=60,
  )
  from jax.experimental import multihost_utils

  from cpo_jax.data.sources import make_source

  out = {"pid": os.getpid(), "error": None}
  try:
    src = make_source(name, "train", data_dir=data_dir, on_bad_record=on_bad_record, num_examples=8)
  except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
  else:
    prepared = os.path.join(data_dir, "_tfds") if name == "codalm" else data_dir
    out["files_after_prepare"] = _files(prepared)
    h = hashlib.sha256()
    for i in range(len(src)):
      r = src[i]
      if name == "codalm":
        h.update(json.dumps([r["chosen"], r["rejected"], r["source"], r["record_id"]]).encode())
        h.update(r["image"] + r["rejected_image"])
      else:
        h.update(r["image"] + r["chain"])
    out.update(n=len(src), rows=h.hexdigest())
    if name == "codalm":
      with open(
        os.path.join(
          prepared, "codalm", f"{on_bad_record}_original", "2.0.0", "cpo_jax_report.json"
        )
      ) as f:
        out["prepared_by"] = json.load(f)["prepared_by"]["pid"]
    multihost_utils.sync_global_devices("read")  # both have read before the final listing
    out["files_at_end"] = _files(prepared)
  out["generated"] = len(generated)
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  _worker(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
