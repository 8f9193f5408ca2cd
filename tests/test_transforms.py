"""Image transforms against the HF CLIP image processor, PIL mode conversion, and tokenisation."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from superclip_pl.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    eval_transform,
    to_rgb,
    train_transform,
)


def random_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = len(Image.new(mode, (1, 1)).getbands())
    array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    image = Image.fromarray(array.squeeze(-1) if channels == 1 else array)
    return image if image.mode == mode else image.convert(mode)


@pytest.mark.parametrize("image_size", [32, 224])
@pytest.mark.parametrize("width,height", [(50, 70), (70, 50), (33, 33), (224, 100), (17, 300), (640, 480)])
def test_eval_transform_equals_clip_image_processor(image_size, width, height):
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    image = random_image(width, height, seed=width * height)
    expected = processor(image, return_tensors="pt")["pixel_values"][0]
    # Bit-identical: the same PIL resize call, the same crop offsets, and the normalisation table
    # is built with the processor's rounding (rescale in float64, cast, normalise in float32).
    torch.testing.assert_close(eval_transform(image_size)(image), expected, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA"])
def test_eval_transform_equals_clip_image_processor_on_other_modes(mode):
    processor = CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})
    image = random_image(40, 30, mode="RGB" if mode == "P" else mode, seed=3)
    if mode == "P":
        image = image.convert("P")
    expected = processor(image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(eval_transform(24)(image), expected, rtol=0, atol=0)


def test_train_transform_shape_normalisation_and_seeded_determinism():
    transform = train_transform(32)
    image = random_image(80, 60, seed=1)
    out = transform(image, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    again = transform(image, generator=torch.Generator().manual_seed(0))
    other = transform(image, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, again, rtol=0, atol=0)
    assert not torch.equal(out, other)

    # a flat colour stays flat through crop + bicubic resize, so the output is exactly normalised
    flat = transform(Image.new("RGB", (50, 40), (255, 128, 0)), generator=torch.Generator().manual_seed(0))
    expected = (torch.tensor([255, 128, 0]) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(flat, expected[:, None, None].expand(3, 32, 32).float())


def test_train_crop_keeps_scale_and_ratio_bounds():
    transform = train_transform(16, scale=(0.9, 1.0))
    generator = torch.Generator().manual_seed(0)
    for width, height in [(100, 100), (110, 100), (100, 115)]:  # crops of scale 0.9+ exist
        for _ in range(200):
            left, top, right, bottom = transform.crop_box(width, height, generator)
            w, h = right - left, bottom - top
            assert left >= 0 and top >= 0 and right <= width and bottom <= height
            # rounding w and h to pixels moves area and ratio a little outside the sampled range
            assert 0.9 * width * height * 0.97 <= w * h <= width * height
            assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05


def test_train_crop_falls_back_to_a_centred_crop_for_extreme_aspect_ratios():
    left, top, right, bottom = train_transform(16).crop_box(400, 20, torch.Generator().manual_seed(0))
    assert (bottom - top, right - left) == (20, round(20 * 4 / 3))
    assert left == (400 - (right - left)) // 2


@pytest.mark.parametrize(
    "mode", ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I", "F"]
)
def test_to_rgb_converts_every_mode(mode):
    image = Image.new(mode, (5, 4))
    out = to_rgb(image)
    assert out.mode == "RGB" and out.size == (5, 4)


def test_to_rgb_values():
    transparent = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    assert to_rgb(transparent).getpixel((0, 0)) == (255, 255, 255)  # composited on white
    half = Image.new("LA", (1, 1), (0, 128))
    assert to_rgb(half).getpixel((0, 0)) == (127, 127, 127)
    palette = Image.new("P", (1, 1), 0)
    palette.putpalette([200, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert to_rgb(palette).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("L", (1, 1), 77)).getpixel((0, 0)) == (77, 77, 77)
    sixteen = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    assert sixteen.mode == "I;16"
    assert [to_rgb(sixteen).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]  # scaled, not clipped
    wide = Image.fromarray(np.array([[65535, 0]], dtype=np.int32))
    assert wide.mode == "I" and to_rgb(wide).getpixel((0, 0)) == (255, 255, 255)
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert unit.mode == "F" and [to_rgb(unit).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_clip_statistics_are_openai_values():
    assert math.isclose(CLIP_MEAN[0], 0.48145466) and math.isclose(CLIP_STD[2], 0.27577711)
