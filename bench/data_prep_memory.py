"""Peak host memory and speed of preparing mimic_ccf files, against the number of records.

  JAX_PLATFORMS=cpu python bench/data_prep_memory.py --n 1000,5000 --workers 1,2

Writes N generated records in the published MIMIC-CXR-JPG + CheXpert + CXR-CounterFact layout
(grey 1024 x 1024 JPEGs of about 200 KB, radiograph-like: smooth structure plus noise; 64
distinct images written under N names, so the fixture is quick to make), then prepares them
at `--image_size` (448: the images resized and stored as PNG) in a fresh process per (N,
workers), and records that process's peak RSS (ru_maxrss) and its RSS before preparing, the
largest worker's and the total (sampled with psutil when installed), and seconds per 1000
records (and images per second). Streaming preparation keeps the main process's peak flat in N
(before it, every image's bytes were held in lists until the split was written; and until the
CXR-CounterFact JSON was read one record at a time, every record's text). Results:
bench/results/data_prep_memory_<date><suffix>.json, rewritten after each run so a long one that
is stopped leaves the runs before it.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
DISTINCT = 64


def radiograph(seed: int, side: int) -> bytes:
  """A grey JPEG of about the size of a MIMIC-CXR-JPG image at this side."""
  rng = np.random.default_rng(seed)
  coarse = rng.normal(size=(32, 32))
  coarse = ((coarse - coarse.min()) / np.ptp(coarse) * 200 + 20).astype(np.uint8)
  smooth = np.asarray(Image.fromarray(coarse).resize((side, side), Image.BICUBIC), np.float32)
  arr = np.clip(smooth + rng.normal(0, 4, (side, side)), 0, 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(arr, "L").save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def write_fixture(root: str, n: int, side: int) -> int:
  """n train records in mimic_ccf's manual layout; returns the bytes of images written."""
  from cpo_jax.data.mimic_files import FINDINGS

  images = [radiograph(k, side) for k in range(DISTINCT)]
  chex, split_rows, recs, total = [], [], [], 0
  for k in range(n):
    subject, study, dicom = 10000000 + k, 50000000 + k, f"d{k:06d}"
    d = os.path.join(root, "files", f"p{str(subject)[:2]}", f"p{subject}", f"s{study}")
    os.makedirs(d)
    with open(os.path.join(d, f"{dicom}.jpg"), "wb") as f:
      f.write(images[k % DISTINCT])
    total += len(images[k % DISTINCT])
    labels = [""] * len(FINDINGS)
    labels[k % len(FINDINGS)] = "1.0"
    chex.append([subject, study, *labels])
    split_rows.append([dicom, study, subject, "train"])
    recs.append(
      {
        "dicom_id": dicom,
        "report": f"Record {k}: the heart size is normal; a small left pleural effusion.",
        "diagnose": FINDINGS[k % len(FINDINGS)],
        "counterfact": {"Pneumothorax": "A pleural line is visible at the apex."},
      }
    )
  with open(os.path.join(root, "mimic-cxr-2.0.0-chexpert.csv"), "w", newline="") as f:
    csv.writer(f).writerows([["subject_id", "study_id", *FINDINGS], *chex])
  with open(os.path.join(root, "mimic-cxr-2.0.0-split.csv"), "w", newline="") as f:
    csv.writer(f).writerows([["dicom_id", "study_id", "subject_id", "split"], *split_rows])
  with open(os.path.join(root, "cxr_counterfact.json"), "w") as f:
    json.dump(recs, f)
  return total


class WorkerSampler(threading.Thread):
  """The largest RSS of this process's children (the preparation's workers) and of this process
  plus all of them, sampled every 0.1 s (psutil). ru_maxrss of children would count the parent's
  pages a spawned worker had mapped between fork and exec."""

  def __init__(self):
    super().__init__(daemon=True)
    import psutil

    self.me, self.stop, self.worker, self.total = psutil.Process(), threading.Event(), 0, 0

  def run(self):
    while not self.stop.wait(0.1):
      try:
        kids = [c.memory_info().rss for c in self.me.children(recursive=True)]
        self.worker = max([self.worker, *kids])
        self.total = max(self.total, self.me.memory_info().rss + sum(kids))
      except Exception:  # a worker that ended between listing and reading
        continue


def child(args) -> None:
  """One preparation in this (fresh) process; prints its measurements as JSON."""
  # Imports before the clock and the baseline: they are not preparation (processors brings
  # transformers, which a run has imported anyway).
  from cpo_jax.data import mimic_ccf
  from cpo_jax.data import processors  # noqa: F401

  try:
    sampler = WorkerSampler()
    sampler.start()
  except ImportError:  # psutil is optional: then only this process's peak
    sampler = None
  before = _rss_now()
  t, cpu = time.perf_counter(), time.process_time()
  src = mimic_ccf.data_source(
    args.manual_dir,
    "train",
    view="records",
    prepared_dir=args.prepared_dir,
    image_size=args.image_size,
    prepare_workers=args.workers,
  )
  seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
  if sampler is not None:
    sampler.stop.set()
    sampler.join()
  stored = [os.path.join(d, f) for d, _, fs in os.walk(args.prepared_dir) for f in fs]
  mib = 1 / 2**20
  print(
    json.dumps(
      {
        "records": len(src),
        "seconds": seconds,
        # CPU seconds: on a shared machine, the work itself (wall time also counts the waits)
        "main_cpu_seconds": cpu,
        "workers_cpu_seconds": resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
        + resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime,
        "rss_before_mib": before * mib,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_worker_rss_mib": sampler.worker * mib if sampler else None,
        "peak_total_rss_mib": sampler.total * mib if sampler else None,
        "prepared_bytes": sum(os.path.getsize(f) for f in stored),
      }
    )
  )


def _rss_now() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--n", default="1000,5000", help="numbers of records, comma-separated")
  p.add_argument("--workers", default="1,2", help="data.prepare_workers values, comma-separated")
  p.add_argument("--side", type=int, default=1024, help="side of the published images")
  p.add_argument("--image_size", type=int, default=448, help="the run's data.image_size")
  p.add_argument("--tmp", default=None, help="where the fixtures go (default: the system's)")
  p.add_argument("--out", default=os.path.join(HERE, "results"))
  p.add_argument("--suffix", default="", help="added to the results file's name")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--manual_dir", help=argparse.SUPPRESS)
  p.add_argument("--prepared_dir", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    args.workers = int(args.workers)
    child(args)
    return
  runs = []
  for n in (int(x) for x in args.n.split(",")):
    with tempfile.TemporaryDirectory(prefix="cpo_jax_prep_bench_", dir=args.tmp) as tmp:
      manual = os.path.join(tmp, "manual")
      t = time.perf_counter()
      image_bytes = write_fixture(manual, n, args.side)
      print(f"N={n}: fixture {image_bytes / 2**20:.0f} MiB in {time.perf_counter() - t:.0f}s")
      for workers in (int(x) for x in args.workers.split(",")):
        prepared = os.path.join(tmp, f"prepared_{workers}")
        command = [sys.executable, __file__, "--child", f"--workers={workers}"]
        command += [f"--manual_dir={manual}", f"--prepared_dir={prepared}"]
        command += [f"--image_size={args.image_size}"]
        out = subprocess.run(command, check=True, capture_output=True, text=True)
        run = json.loads(out.stdout.strip().splitlines()[-1])
        run.update(n=n, workers=workers, published_image_bytes=image_bytes)
        run["seconds_per_1k"] = run["seconds"] / n * 1000
        run["images_per_second"] = n / run["seconds"]
        runs.append(run)
        print(
          f"N={n} workers={workers}: peak RSS {run['peak_rss_mib']:.0f} MiB (before preparing "
          f"{run['rss_before_mib']:.0f}; largest worker {run['peak_worker_rss_mib'] or 0:.0f} "
          f"MiB, all {run['peak_total_rss_mib'] or 0:.0f} MiB), {run['seconds_per_1k']:.1f} s "
          f"per 1k records (CPU s: main {run['main_cpu_seconds']:.1f}, workers "
          f"{run['workers_cpu_seconds']:.1f}), {run['prepared_bytes'] / n / 1024:.0f} KiB per "
          f"prepared record, {run['images_per_second']:.1f} images/s"
        )
        shutil.rmtree(prepared)
        write_result(args, runs)


def write_result(args, runs: list[dict]) -> None:
  """The results so far (every run's, in order) to bench/results/."""
  os.makedirs(args.out, exist_ok=True)
  name = f"data_prep_memory_{datetime.date.today().isoformat()}{args.suffix}.json"
  path = os.path.join(args.out, name)
  result = {
    "command": " ".join(["python", "bench/data_prep_memory.py", *sys.argv[1:]]),
    "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    "published_side": args.side,
    "image_size": args.image_size,
    "runs": runs,
  }
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
