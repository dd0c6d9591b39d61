"""Pairs/second of the CPO data pipeline per host (synth_drive), at 112x112 and 448x448.

  JAX_PLATFORMS=cpu python bench/data_pipeline.py [--workers 0] [--batches 30]
Compare with the train step's consumption: batch_size / step_time pairs/s.
"""

import argparse
import io
import time

from PIL import Image

from cpo_jax.data import datasets
from cpo_jax.data import processors
from cpo_jax.data import sources


class Upscaled:
  """Same records, images resized to `size` (the renderer draws 112x112)."""

  def __init__(self, src, size):
    self.src, self.size, self.domain = src, size, getattr(src, "domain", "driving")

  def __len__(self):
    return len(self.src)

  def __getitem__(self, i):
    r = dict(self.src[i])
    im = Image.open(io.BytesIO(r["image"])).resize((self.size, self.size), Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)
    r["image"] = buf.getvalue()
    return r

  def labels(self):
    return self.src.labels()


def measure(size, workers, batches, batch_size=8):
  proc = processors.make_processors(None, image_size=size)
  src = sources.make_source("synth_drive", "train", num_examples=2048)
  src = src if size == 112 else Upscaled(src, size)
  n_img = (size // 28) ** 2
  it = datasets.make_cpo_iterator(
    src, proc, batch_size=batch_size, max_len=96 + n_img, seed=0, worker_count=workers
  )
  next(it)
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * batch_size / (time.perf_counter() - t)


if __name__ == "__main__":
  ap = argparse.ArgumentParser()
  ap.add_argument("--workers", type=int, default=0)
  ap.add_argument("--batches", type=int, default=30)
  args = ap.parse_args()
  for size in (112, 448):
    print(
      f"synth_drive CPO pairs/s at {size}x{size}, workers={args.workers}: "
      f"{measure(size, args.workers, args.batches):.0f}"
    )
