"""Image preprocessing with PIL, NumPy and torch only (no torchvision).

`eval_transform` reproduces `transformers.CLIPImageProcessorPil` exactly (same PIL resize call, same
crop offsets, same float rounding), so a model trained here sees at test time what the exported HF
processor gives it. `train_transform` is open_clip's training augmentation: RandomResizedCrop with
scale (0.9, 1.0) and ratio (3/4, 4/3), bicubic, then the same normalisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

# OpenAI CLIP's per-channel statistics (RGB), as in transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB.

    Transparency (RGBA, LA, PA, P or L with a transparent colour) is composited onto *white*, as
    `CLIPImageProcessor` does, so train and test see the same pixels. 16-bit images ("I;16*", and
    "I" with values above 255) are scaled to 8 bits rather than clipped; float images ("F") are read
    as [0, 1] when they lie in it and as [0, 255] otherwise. Everything else (L, 1, CMYK, YCbCr, ...)
    goes through PIL's own conversion.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        return Image.fromarray(_high_depth_to_uint8(image)).convert("RGB")
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_uint8(image: Image.Image) -> np.ndarray:
    """(H, W) uint8 from a 16/32-bit integer or float single-channel image."""
    array = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        scale = 255.0 if array.size and array.min() >= 0.0 and array.max() <= 1.0 else 1.0
    elif image.mode in _SIXTEEN_BIT_MODES or (array.size and array.max() > 255):
        scale = 255.0 / 65535.0
    else:
        scale = 1.0
    return np.clip(np.rint(array * scale), 0, 255).astype(np.uint8)


def normalize(pixels: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
    """(..., 3, H, W) uint8 RGB -> float32 `(x / 255 - mean) / std`, on whatever device `pixels` is.

    Bit-identical to CLIPImageProcessor (which rescales in float64, casts to float32 and normalises in
    float32): x / 255 in float32 is correctly rounded, as is the float64 quotient cast to float32, and
    the test checks all 256 levels. Training ships uint8 images from the DataLoader workers (a quarter
    of the bytes, no float work there) and calls this on the device after the transfer.
    """
    pixels = pixels.contiguous()  # a batch of channels-first views (`decode.stack_images`)
    shape = (3, 1, 1)
    mean32 = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(shape)
    std32 = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(shape)
    return (pixels.to(torch.float32) / 255).sub_(mean32).div_(std32)


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) uint8 tensor (a channels-first view of one writable copy)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


class EvalTransform:
    """Resize the shortest side to `image_size` (bicubic), centre-crop a square, normalise (or, with
    `normalized=False`, return the (3, H, W) uint8 crop for `normalize` to finish later)."""

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        normalized: bool = True,
    ):
        self.image_size, self.mean, self.std, self.normalized = image_size, mean, std, normalized

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = to_rgb(image)
        s, (w, h) = self.image_size, image.size
        # same output size rule as transformers' get_resize_output_image_size(default_to_square=False)
        new_w, new_h = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        rgb = np.asarray(image.resize((new_w, new_h), Image.Resampling.BICUBIC))
        top, left = (new_h - s) // 2, (new_w - s) // 2
        pixels = torch.from_numpy(rgb[top : top + s, left : left + s].copy()).permute(2, 0, 1)
        return normalize(pixels, self.mean, self.std) if self.normalized else pixels


class TrainTransform:
    """RandomResizedCrop(image_size, scale, ratio=(3/4, 4/3), bicubic), then normalise.

    Crop parameters are drawn from `generator` when given (reproducible), else from torch's global
    RNG, which DataLoader seeds differently in every worker. With `normalized=False` the result is the
    (3, H, W) uint8 crop, for `normalize` to finish on the device.
    """

    def __init__(
        self,
        image_size: int,
        scale: tuple[float, float] = (0.9, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        normalized: bool = True,
    ) -> None:
        self.image_size, self.scale, self.ratio = image_size, tuple(scale), tuple(ratio)
        self.mean, self.std, self.normalized = mean, std, normalized

    def crop_box(self, width: int, height: int, generator: torch.Generator | None = None) -> tuple[int, ...]:
        """(left, top, right, bottom) of the random crop, torchvision's RandomResizedCrop.get_params."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        # all draws of the 10 attempts at once: one RNG call per image instead of up to 40
        for u_scale, u_ratio, u_top, u_left in torch.rand(10, 4, generator=generator).tolist():
            target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * u_scale)
            aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u_ratio)
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = min(int(u_top * (height - h + 1)), height - h)
                left = min(int(u_left * (width - w + 1)), width - w)
                return left, top, left + w, top + h
        # fall back to the largest centred crop whose aspect ratio lies in `ratio`
        aspect = width / height
        if aspect < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif aspect > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        image = to_rgb(image)
        box = self.crop_box(*image.size, generator=generator)
        size = (self.image_size, self.image_size)
        pixels = to_uint8_tensor(image.resize(size, Image.Resampling.BICUBIC, box=box))
        return normalize(pixels, self.mean, self.std) if self.normalized else pixels


def train_transform(
    image_size: int,
    scale: tuple[float, float] = (0.9, 1.0),
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    normalized: bool = True,
) -> TrainTransform:
    """Training augmentation: PIL image -> (3, image_size, image_size) float tensor (uint8 unnormalised)."""
    return TrainTransform(image_size, scale=scale, mean=mean, std=std, normalized=normalized)


def eval_transform(
    image_size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    normalized: bool = True,
) -> EvalTransform:
    """Evaluation preprocessing, equal to CLIPImageProcessorPil(shortest_edge=crop=image_size) (with
    `normalized=False`: its uint8 crop, which `normalize` turns into exactly that)."""
    return EvalTransform(image_size, mean=mean, std=std, normalized=normalized)
