"""Which columns a stream reads: the image candidates, the caption columns with their probabilities,
and whatever names a sample; picked among a source's columns, or one clear error naming them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from superclip_pl.data.sources import DataSource

# filepath / title: open_clip's CSV columns; file_name: HF imagefolder's metadata column
IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "img", "filepath", "file_name")
TEXT_COLUMNS = ("txt", "caption", "text", "captions", "title")
# columns that name a sample (webdataset's __key__ / __url__, or an id column): kept for `keys`
KEY_COLUMNS = ("__key__", "__url__", "key", "id")


@dataclass(frozen=True)
class Columns:
    """The columns a stream reads.

    images: candidates in order; a sample's image is the first of them it has.
    texts: caption columns and the probability of drawing each (summing to 1).
    keys: columns that name a sample.
    """

    images: tuple[str, ...]
    texts: tuple[tuple[str, float], ...]
    keys: tuple[str, ...] = ()

    @property
    def all(self) -> list[str]:
        return [*self.images, *(c for c, _ in self.texts), *self.keys]


def _find(columns: list[str], wanted: str) -> str | None:
    """`wanted` among `columns`, exactly or else ignoring case."""
    if wanted in columns:
        return wanted
    return next((c for c in columns if c.lower() == wanted.lower()), None)


def _probabilities(given: Mapping[str, float], source: DataSource, role: str) -> list[tuple[str, float]]:
    bad = {c: p for c, p in given.items() if not isinstance(p, int | float) or p < 0}
    total = sum(p for p in given.values() if isinstance(p, int | float))
    if not given or bad or total <= 0:
        raise ValueError(
            f"data.{role}.text_column: {dict(given)!r} must map caption columns to probabilities >= 0 "
            f"with a positive sum, e.g. {{txt: 0.5, recaption: 0.5}} ({source.describe()})"
        )
    return [(c, p / total) for c, p in given.items()]


def resolve_columns(
    found: list[str], source: DataSource, role: str = "train", schema_less: bool = False
) -> Columns:
    """Pick the image, caption and key columns among the `found` ones, or fail naming what exists.

    `schema_less`: the source's samples may differ in their fields (webdataset tars), so `found`
    is what its first samples showed; image candidates not among them are kept (a later sample may
    have them), and auto-detection keeps every standard image column.
    """

    def missing(kind: str, given) -> ValueError:
        seen = " (in its first samples)" if schema_less else ""
        return ValueError(
            f"data.{role}.{kind}_column: {given!r} is not a column of {source.describe()}{seen}; "
            f"columns found: {found}"
        )

    def undetected(kind: str, candidates: tuple[str, ...]) -> ValueError:
        return ValueError(
            f"data.{role}: no {kind} column in {source.describe()} (looked for {', '.join(candidates)}); "
            f"set data.{role}.{kind}_column to one of the columns found: {found}"
        )

    given = source.image_column
    if isinstance(given, str):
        if (image := _find(found, given)) is None:
            raise missing("image", given)
        images = [image]
    else:
        candidates = IMAGE_COLUMNS if given is None else tuple(given)
        present = [c for c in (_find(found, w) for w in candidates) if c is not None]
        if not present:
            raise undetected("image", candidates) if given is None else missing("image", list(given))
        images = present + ([c for c in candidates if c not in present] if schema_less else [])

    given = source.text_column
    if given is None:
        text = next((c for c in (_find(found, w) for w in TEXT_COLUMNS) if c is not None), None)
        if text is None:
            raise undetected("text", TEXT_COLUMNS)
        texts = [(text, 1.0)]
    else:
        texts = [(given, 1.0)] if isinstance(given, str) else _probabilities(given, source, role)
        for i, (column, p) in enumerate(texts):
            if (resolved := _find(found, column)) is None:
                raise missing("text", column)
            texts[i] = (resolved, p)
    taken = {*images, *(c for c, _ in texts)}
    keys = tuple(c for c in KEY_COLUMNS if c in found and c not in taken)
    return Columns(images=tuple(images), texts=tuple(texts), keys=keys)


def columns_found(first: list[dict]) -> list[str]:
    """The columns of a source's first examples, in the order first seen."""
    return list(dict.fromkeys(c for example in first for c in example))
