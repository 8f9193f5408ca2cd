"""One raw example -> a decoded training sample, or the reason it is skipped; batches of samples.

Bad samples never crash a run and never vanish silently: each is returned as one of the reasons of
`skips.REASONS`, and its count rides along with the next batch (`skips.py` adds them up).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from collections import Counter
from collections.abc import Callable, Mapping

import fsspec
import torch
from PIL import Image

from superclip_pl.data.skips import REASONS
from superclip_pl.data.sources import Columns
from superclip_pl.tokenizer import tokenize

# the caption fields looked up inside a JSON / dict caption
CAPTION_FIELDS = ("caption", "captions", "text", "txt")


def caption_candidates(value) -> list[str]:
    """Non-empty captions in `value`: a text, bytes, a list, a dict with a caption field, or JSON of those."""
    if value is None:
        return []
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        text = value.strip()
        if text[:1] in ("[", "{"):
            try:
                return caption_candidates(json.loads(text))
            except ValueError:
                pass  # a caption that merely starts with a bracket
        # several lines are several captions of the image (CLIP_benchmark retrieval sets, COCO dumps)
        return [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(value, Mapping):
        field = next((f for f in CAPTION_FIELDS if f in value), None)
        return caption_candidates(value[field]) if field else []
    if isinstance(value, (list, tuple)):
        return [c for v in value for c in caption_candidates(v)]
    return []


def image_payload(value) -> bytes | Image.Image | None:
    """The encoded bytes of an image cell (HF `Image(decode=False)` dict, raw bytes, or a path)."""
    if isinstance(value, Image.Image):
        return value  # a source whose features are unknown may hand over decoded images
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    path = value
    if isinstance(value, Mapping):
        if value.get("bytes"):
            return value["bytes"]
        path = value.get("path")
    if not isinstance(path, str) or not path:
        return None
    # image folders stream paths, not bytes: local files or hf:// / https:// URLs
    with fsspec.open(path, "rb") as f:
        return f.read()


def open_image(payload: bytes | Image.Image, max_pixels: int, draft: int | None = None) -> Image.Image | str:
    """Decode `payload` fully, or return "too_large" / "corrupt_image".

    With `draft`, a JPEG is decoded at 1/2, 1/4 or 1/8 scale when that still leaves both sides at
    least `draft` pixels: several times faster for large photos, and the result is resized anyway.
    """
    try:
        with warnings.catch_warnings():
            # our own max_pixels decides; PIL's bomb warning would only be noise here
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = payload if isinstance(payload, Image.Image) else Image.open(io.BytesIO(payload))
        if image.width * image.height > max_pixels:  # known from the header, nothing decoded yet
            return "too_large"
        if draft and image.format == "JPEG":
            image.draft(image.mode, (draft, draft))
        image.load()
        return image
    except Image.DecompressionBombError:
        return "too_large"
    except Exception:  # decoders of untrusted bytes raise all kinds of errors
        return "corrupt_image"


def sample_key(example: Mapping, columns: Columns, payload) -> str:
    """A name for the sample: webdataset shard/key, a key or id column, the image path, or a hash."""
    if example.get("__key__") is not None:
        url = example.get("__url__")
        return f"{os.path.basename(url)}/{example['__key__']}" if url else str(example["__key__"])
    for column in ("key", "id"):
        if column in columns.keys and example.get(column) is not None:
            return str(example[column])
    cell = example.get(columns.image)
    if isinstance(cell, Mapping) and cell.get("path"):
        return str(cell["path"])
    if isinstance(cell, str) and cell:
        return cell
    data = payload if isinstance(payload, bytes) else payload.tobytes()
    return hashlib.sha1(data).hexdigest()[:16]


class SampleDecoder:
    """Raw example -> `{"key", "pixel_values", "text"}`, or the name of the reason it is skipped.

    Args:
        columns: the image, caption and key columns.
        transform: PIL image -> (3, H, W) tensor.
        max_image_pixels: images with more pixels are skipped before they are decoded.
        random_caption: pick one of several captions at random (training) instead of the first.
        draft: decode JPEGs at a reduced scale that keeps at least this many pixels per side
            (training; evaluation decodes fully to match the HF image processor exactly).
    """

    def __init__(
        self,
        columns: Columns,
        transform: Callable[[Image.Image], torch.Tensor],
        max_image_pixels: int,
        random_caption: bool,
        draft: int | None = None,
    ) -> None:
        self.columns, self.transform, self.draft = columns, transform, draft
        self.max_image_pixels, self.random_caption = max_image_pixels, random_caption

    def __call__(self, example: Mapping, choice: float = 0.0) -> dict | str:
        """`choice` in [0, 1) picks the caption when there are several and `random_caption` is set."""
        captions = caption_candidates(example.get(self.columns.text))
        if not captions:
            return "empty_caption"  # checked first: cheaper than decoding an image we would drop
        try:
            payload = image_payload(example.get(self.columns.image))
        except (OSError, ValueError):  # a path that cannot be opened
            return "missing_image"
        if payload is None:
            return "missing_image"
        image = open_image(payload, self.max_image_pixels, self.draft)
        if isinstance(image, str):
            return image
        try:
            pixel_values = self.transform(image)
        except Exception:  # e.g. a mode PIL cannot convert to RGB
            return "corrupt_image"
        text = captions[int(choice * len(captions))] if self.random_caption else captions[0]
        return {"key": sample_key(example, self.columns, payload), "pixel_values": pixel_values, "text": text}


class Collate:
    """Samples -> a batch with the HF names, plus `keys` and the skip counts since the last batch.

    Tokenising here, once per batch in the DataLoader worker, is much faster than per sample.
    """

    def __init__(self, tokenizer, max_length: int = 77) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, samples: list[dict]) -> dict:
        skipped: Counter[str] = Counter()
        for sample in samples:
            skipped.update(sample.get("skipped", {}))
        return {
            "pixel_values": torch.stack([s["pixel_values"] for s in samples]),  # (B, 3, H, W)
            **tokenize(self.tokenizer, [s["text"] for s in samples], self.max_length),  # (B, T) each
            "keys": [s["key"] for s in samples],
            "skipped": {reason: skipped[reason] for reason in REASONS if skipped[reason]},
        }
