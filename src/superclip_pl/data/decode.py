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
from collections.abc import Callable, Mapping, Sequence

import fsspec
import torch
from PIL import Image
from torch.utils.data import default_collate

from superclip_pl.data import jpeg
from superclip_pl.data.columns import Columns
from superclip_pl.data.csvfiles import BAD_ROW
from superclip_pl.data.skips import REASONS
from superclip_pl.tokenizer import tokenize
from superclip_pl.transforms import TrainTransform, normalize

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


def sample_key(example: Mapping, columns: Columns, cell, payload) -> str:
    """A name for the sample: webdataset shard/key, a key or id column, the image path, or a hash."""
    if example.get("__key__") is not None:
        url = example.get("__url__")
        return f"{os.path.basename(url)}/{example['__key__']}" if url else str(example["__key__"])
    for column in ("key", "id"):
        if column in columns.keys and example.get(column) is not None:
            return str(example[column])
    if isinstance(cell, Mapping) and cell.get("path"):
        return str(cell["path"])
    if isinstance(cell, str) and cell:
        return cell
    data = payload if isinstance(payload, bytes) else payload.tobytes()
    return hashlib.sha1(data).hexdigest()[:16]


def draw(options: Sequence[tuple[str, float]], u: float) -> str:
    """The option whose share of [0, 1) contains `u` (probabilities summing to 1)."""
    total = 0.0
    for option, p in options:
        total += p
        if u < total:
            return option
    return options[-1][0]  # rounding left u just above the sum


class SampleDecoder:
    """Raw example -> `{"key", "pixel_values", "text", "source", "fallback"}`, or the name of the
    reason it is skipped.

    Args:
        columns: the image candidates, caption columns (with probabilities) and key columns.
        transform: PIL image -> (3, H, W) tensor (uint8 for the data module: normalised on the device).
        max_image_pixels: images with more pixels are skipped before they are decoded.
        random_caption: draw the caption column (by its probability) and one of several captions at
            random (training) instead of taking the first non-empty column's first caption.
        draft: decode JPEGs at a reduced scale that keeps at least this many pixels per side
            (training; evaluation decodes fully to match the HF image processor exactly).
        source: the source's name, carried by each sample for the per-source counts (None: unnamed).
        opencv: decode JPEGs with OpenCV (`jpeg.py`) where it can, for a `TrainTransform` with `draft`;
            everything else, and whatever OpenCV is unsure of, goes through PIL.
    """

    def __init__(
        self,
        columns: Columns,
        transform: Callable[[Image.Image], torch.Tensor],
        max_image_pixels: int,
        random_caption: bool,
        draft: int | None = None,
        source: str | None = None,
        opencv: bool = False,
    ) -> None:
        self.columns, self.transform, self.draft, self.source = columns, transform, draft, source
        self.max_image_pixels, self.random_caption = max_image_pixels, random_caption
        self.opencv = opencv and bool(draft) and isinstance(transform, TrainTransform) and jpeg.available()

    def _opencv_pixels(self, payload, generator: torch.Generator | None) -> torch.Tensor | None:
        """The training crop of a JPEG decoded by OpenCV, or None to decode it with PIL."""
        if not self.opencv or not isinstance(payload, bytes):
            return None
        rgb = jpeg.decode_reduced(payload, self.draft, self.max_image_pixels)
        if rgb is None:
            return None
        t = self.transform
        box = t.crop_box(rgb.shape[1], rgb.shape[0], generator)
        pixels = torch.from_numpy(jpeg.crop_resize(rgb, box, t.image_size)).permute(2, 0, 1)
        return normalize(pixels, t.mean, t.std) if t.normalized else pixels

    def caption(self, example: Mapping, u_column: float, u_caption: float) -> tuple[str | None, bool]:
        """(caption or None, whether the drawn column was empty and another one was used)."""
        texts = self.columns.texts
        if not self.random_caption:  # evaluation: the first non-empty column, its first caption
            captions = next((c for c in (caption_candidates(example.get(t)) for t, _ in texts) if c), [])
            return (captions[0] if captions else None), False
        column = draw(texts, u_column) if len(texts) > 1 else texts[0][0]
        captions, fallback = caption_candidates(example.get(column)), False
        if not captions and len(texts) > 1:
            # the same uniform redrawn over the non-empty columns, renormalised: seeded like the first draw
            options = [(t, p) for t, p in texts if t != column and caption_candidates(example.get(t))]
            if options:
                total = sum(p for _, p in options)
                column = draw([(t, p / total) for t, p in options], u_column)
                captions, fallback = caption_candidates(example.get(column)), True
        if not captions:
            return None, False
        return captions[min(int(u_caption * len(captions)), len(captions) - 1)], fallback

    def __call__(self, example: Mapping, choice: Sequence[float] = (0.0, 0.0)) -> dict | str:
        """`choice`: two uniforms in [0, 1), drawing the caption column and the caption in it, and
        optionally the seed of the random crop (without one a training crop draws from torch's global
        RNG)."""
        if BAD_ROW in example:
            return "bad_row"
        text, fallback = self.caption(example, choice[0], choice[1])
        if text is None:
            return "empty_caption"  # checked first: cheaper than decoding an image we would drop
        cell = next((example[c] for c in self.columns.images if example.get(c) is not None), None)
        try:
            payload = image_payload(cell)
        except (OSError, ValueError):  # a path that cannot be opened
            return "missing_image"
        if payload is None:
            return "missing_image"
        random_crop = isinstance(self.transform, TrainTransform) and len(choice) > 2
        generator = torch.Generator().manual_seed(int(choice[2])) if random_crop else None
        pixel_values = self._opencv_pixels(payload, generator)
        if pixel_values is None:
            image = open_image(payload, self.max_image_pixels, self.draft)
            if isinstance(image, str):
                return image
            try:
                pixel_values = self.transform(image, generator) if random_crop else self.transform(image)
            except Exception:  # e.g. a mode PIL cannot convert to RGB
                return "corrupt_image"
        return {
            "key": sample_key(example, self.columns, cell, payload),
            "pixel_values": pixel_values,
            "text": text,
            "source": self.source,
            "fallback": fallback,
        }


def stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """(B, 3, H, W) from (3, H, W) images, by `default_collate` (into shared memory in a worker).

    The decoders' uint8 images are channels-first views of (H, W, 3) arrays: those are stacked as
    they lie in memory (a plain copy, where stacking the views gathers bytes three apart) and the
    batch is the same channels-first view of the result; `normalize` makes it contiguous on the
    device."""
    hwc = [image.permute(1, 2, 0) for image in images]
    if all(h.is_contiguous() for h in hwc):
        return default_collate(hwc).permute(0, 3, 1, 2)
    return default_collate(images)


class Collate:
    """Samples -> a batch with the HF names, plus `keys`, the skip counts since the last batch and
    the per-source counts (`counts`: {source: [samples read, caption fallbacks]}).

    Tokenising here, once per batch in the DataLoader worker, is much faster than per sample; the
    images are stacked by `default_collate`, which in a worker writes them straight into shared
    memory (no second copy when the batch is sent to the main process).

    Args:
        tokenizer: the caption tokenizer.
        max_length: tokens the text tower sees (`input_ids`).
        class_max_length: tokens the classification targets come from; when it differs from
            `max_length` the batch also carries them as `class_ids`.
    """

    def __init__(self, tokenizer, max_length: int = 77, class_max_length: int | None = None) -> None:
        self.tokenizer, self.max_length, self.class_max_length = tokenizer, max_length, class_max_length

    def __call__(self, samples: list[dict]) -> dict:
        skipped: Counter[str] = Counter()
        counts: dict[str | None, list[int]] = {}
        for sample in samples:
            skipped.update(sample.get("skipped", {}))
            read = counts.setdefault(sample.get("source"), [0, 0])
            read[0] += 1 + sum(sample.get("skipped", {}).values())
            read[1] += int(sample.get("fallback", False))
        texts = [s["text"] for s in samples]
        return {
            "pixel_values": stack_images([s["pixel_values"] for s in samples]),  # (B, 3, H, W)
            **tokenize(self.tokenizer, texts, self.max_length, self.class_max_length),  # (B, T) each
            "keys": [s["key"] for s in samples],
            "skipped": {reason: skipped[reason] for reason in REASONS if skipped[reason]},
            "counts": counts,
        }
