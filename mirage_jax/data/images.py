"""CLIP image preprocessing in numpy/PIL, as transformers' `CLIPImageProcessor` does it, plus LLaVA-1.5's
pad-to-square.

`clip_preprocess` = resize the shortest side to `size` (PIL bicubic on uint8, the long side floored), center
crop to `crop` x `crop`, rescale by 1/255 and normalise with the CLIP mean/std. LLaVA-1.5 (`image_aspect_ratio
pad`) first pads the image to a square with the mean colour (`expand_to_square`), so nothing is cropped away.

Datasets store the uint8 image after the geometric steps (`clip_resize_crop`, at the model's image size); the
data pipeline rescales and normalises (`mirage_jax.data.preprocess.normalize_image`), which together equal
`clip_preprocess` (tests compare against transformers).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import numpy as np
from PIL import Image

from mirage_configs.common import CLIP_MEAN, CLIP_STD  # the one definition: the configs' defaults use them too


class Aspect(str, enum.Enum):
  """How a non-square image becomes square."""

  PAD = "pad"  # LLaVA-1.5: pad to a square with the mean colour, then resize (nothing cut off)
  CROP = "crop"  # plain CLIP / the llava-hf processor: resize the shortest side, center crop


def to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
  """A PIL RGB image from a PIL image (any mode) or an [H, W, 3] / [H, W] uint8 array."""
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8:
      raise ValueError(f"image arrays must be uint8, got {image.dtype}")
    image = Image.fromarray(image)
  return image.convert("RGB")


def expand_to_square(image: Image.Image, background: Sequence[int]) -> Image.Image:
  """LLaVA's `expand2square`: paste the image centred on a square canvas of colour `background`."""
  w, h = image.size
  if w == h:
    return image
  side = max(w, h)
  canvas = Image.new(image.mode, (side, side), tuple(int(c) for c in background))
  canvas.paste(image, ((side - w) // 2, (side - h) // 2))
  return canvas


def mean_colour(mean: Sequence[float] = CLIP_MEAN) -> tuple[int, ...]:
  """The padding colour LLaVA uses: `int(x * 255)` of the normalisation mean."""
  return tuple(int(m * 255) for m in mean)


def shortest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
  """(height, width) after resizing the shortest side to `size` (transformers' rule: long side floored)."""
  short, long = min(height, width), max(height, width)
  new_long = int(size * long / short)
  return (new_long, size) if width <= height else (size, new_long)


def center_crop(image_hwc: np.ndarray, crop: int) -> np.ndarray:
  h, w = image_hwc.shape[:2]
  if h < crop or w < crop:
    raise ValueError(f"cannot center-crop a {h}x{w} image to {crop}x{crop}")
  top, left = (h - crop) // 2, (w - crop) // 2
  return image_hwc[top:top + crop, left:left + crop]


def clip_resize_crop(image: Image.Image | np.ndarray, size: int, *, crop: int | None = None,
                     aspect: Aspect | str = Aspect.CROP, mean: Sequence[float] = CLIP_MEAN) -> np.ndarray:
  """The geometric half of CLIP preprocessing: uint8 [crop, crop, 3] (crop defaults to size)."""
  crop = size if crop is None else crop
  image = to_rgb(image)
  if Aspect(aspect) == Aspect.PAD:
    image = expand_to_square(image, mean_colour(mean))
  h, w = shortest_side_size(image.height, image.width, size)
  resized = np.asarray(image.resize((w, h), resample=Image.Resampling.BICUBIC), np.uint8)
  return center_crop(resized, crop)


def normalize(image_hwc: np.ndarray, mean: Sequence[float] = CLIP_MEAN,
              std: Sequence[float] = CLIP_STD) -> np.ndarray:
  """uint8 -> float32 (x / 255 - mean) / std."""
  x = np.asarray(image_hwc, np.float32) / 255.0
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def clip_preprocess(image: Image.Image | np.ndarray, size: int, *, crop: int | None = None,
                    aspect: Aspect | str = Aspect.CROP, mean: Sequence[float] = CLIP_MEAN,
                    std: Sequence[float] = CLIP_STD) -> np.ndarray:
  """Model-ready float32 [crop, crop, 3] (channels last; transformers returns channels first)."""
  return normalize(clip_resize_crop(image, size, crop=crop, aspect=aspect, mean=mean), mean, std)
