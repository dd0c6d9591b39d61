"""The image work of preparing mimic_ccf and codalm files: read, check, resize, encode.

Runs in the preparation's worker processes (cpo_jax/data/worker_pool.py), so it imports little
(no TFDS, no transformers) and takes and returns plain picklable values.

Images are stored at the run's square side, exactly as the run's processor would make them
from the published file (`square_rgb` follows processors.Processors.image_inputs: any image that
is not already side x side RGB is converted to RGB and resized bicubically to the square), then
encoded as PNG: lossless, so the stored image gives bit-identical pixel_values to the published
one (tested), where a JPEG re-encode would add a second round of artefacts. Grey images (MIMIC)
are stored as one-channel PNGs: the processor turns them back into the same RGB square. Side 0
keeps the published bytes (what the files held before preparation resized them).
"""

from __future__ import annotations

import dataclasses
import io

from etils import epath
import numpy as np
from PIL import Image
from PIL import ImageDraw

from cpo_jax.data.pairs import thumbnail

# zlib level 4: on radiograph-like 448 px images (bench/data_prep_memory.py) as small as the
# default 6 at 0.4 times its time; level 1 is 20% larger.
PNG_COMPRESS_LEVEL = 4
BOX_JPEG_QUALITY = 95  # side 0: a drawn box is stored as convert2vqa.py-like JPEG, as before.


@dataclasses.dataclass(frozen=True)
class ImageJob:
  """One published image to prepare: `path` (local or gs://), `side` (0 = keep the bytes), and
  `boxes`: xywh boxes to draw one at a time as a red rectangle (CODA-LM regions, as
  convert2vqa.py draws them), each giving one more image; `boxed_paths[k]` is a published image
  with box k already drawn (used instead of drawing it), or ''."""

  path: str
  side: int = 0
  boxes: tuple = ()
  boxed_paths: tuple = ()


@dataclasses.dataclass
class ImageResult:
  """`error` is '' or why the image cannot be used (then nothing else is set); `size` is the
  published (width, height); `boxed[k]` is box k's image bytes, or a str saying why not."""

  error: str = ''
  image: bytes = b''
  thumbnail: np.ndarray | None = None
  size: tuple[int, int] = (0, 0)
  boxed: list = dataclasses.field(default_factory=list)


def square_rgb(image: Image.Image, side: int) -> np.ndarray:
  """[side, side, 3] uint8: what Processors.image_inputs makes of `image` before normalising."""
  arr = np.asarray(image)
  if arr.shape == (side, side, 3) and arr.dtype == np.uint8:
    return arr
  return np.asarray(image.convert('RGB').resize((side, side), Image.BICUBIC))


def _square(image: Image.Image, side: int) -> np.ndarray:
  """`square_rgb`, as [side, side] for a grey (mode L) image: resizing its one band is
  bit-identical to resizing the three equal bands the processor makes of it (tested), at a
  third of the work."""
  if image.mode == 'L':
    return np.asarray(image.resize((side, side), Image.BICUBIC))
  return square_rgb(image, side)


def encode_square(image: Image.Image, side: int) -> bytes:
  """`square_rgb` as PNG bytes; one channel when R == G == B everywhere (lossless either way)."""
  arr = _square(image, side)
  if arr.ndim == 3 and (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all():
    arr = arr[..., 0]
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format='PNG', compress_level=PNG_COMPRESS_LEVEL)
  return buf.getvalue()


def draw_box(rgb: Image.Image, box) -> Image.Image:
  """A copy of the RGB image with the xywh box drawn as convert2vqa.py draws it (red, width 2)."""
  out = rgb.copy()
  x, y, w, h = [float(v) for v in box]
  ImageDraw.Draw(out).rectangle([x, y, x + w, y + h], outline='red', width=2)
  return out


def _jpeg(image: Image.Image) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format='JPEG', quality=BOX_JPEG_QUALITY)
  return buf.getvalue()


def _read(path: str) -> bytes:
  return epath.Path(path).read_bytes()


def prepare_image(job: ImageJob | None) -> ImageResult | None:
  """Reads, checks (decodes), thumbnails, resizes and encodes one image and its boxed copies.
  Never raises for a bad file: the result says why, and the builder turns that into a bad
  record naming the record and the field (a worker's exception would lose the record)."""
  if job is None:  # a record that needs no image (already found bad)
    return None
  try:
    data = _read(job.path)
  except OSError as e:
    return ImageResult(error=f'cannot read image {job.path}: {e.strerror or e!r}')
  try:
    thumb = thumbnail(data)  # of the published image, whatever the stored size
    image = Image.open(io.BytesIO(data))
    size = image.size
    if job.side or job.boxes:
      image.load()  # the whole file decodes (a truncated one fails here)
    stored = encode_square(image, job.side) if job.side else data
    rgb = image.convert('RGB') if job.boxes else None  # once for all the boxes drawn on it
  except Exception as e:  # PIL raises several types for a truncated or foreign file
    return ImageResult(error=f'cannot decode image {job.path}: {e!r}')
  boxed = [_boxed(rgb, box, pre, job) for box, pre in zip(job.boxes, job.boxed_paths)]
  return ImageResult(image=stored, thumbnail=thumb, size=size, boxed=boxed)


def _boxed(rgb: Image.Image, box, published: str, job: ImageJob) -> bytes | str:
  """One region's image (bytes), or why it cannot be made (str)."""
  try:
    if published:
      data = _read(published)
      return encode_square(Image.open(io.BytesIO(data)), job.side) if job.side else data
    drawn = draw_box(rgb, box)
    return encode_square(drawn, job.side) if job.side else _jpeg(drawn)
  except Exception as e:  # an unreadable published box image, or a box PIL cannot draw
    return f'cannot draw the box on {job.path}: {e!r}'
