"""Captions of the shape scenes: English sentences naming every object's size, colour and shape.

Each style has its own sentence patterns. ``classic`` (11 patterns) varies the wording (synonyms of
the sizes, positions, the count, the background); ``primary`` and ``small`` (3 patterns) keep a
word-level vocabulary (19 and 22 words), so that the vocabulary head's targets are the attributes
themselves.
"""

from __future__ import annotations

import random

from superclip_pl.shapes.scenes import COUNT_WORDS, SIZE_WORDS


def _where(obj: dict, rng: random.Random) -> str:
    row, col = obj["row"], obj["col"]
    if row == "middle" and col == "centre":
        return rng.choice(("in the centre", "in the middle"))
    if row == "middle":
        return f"on the {col}"
    if col == "centre":
        return f"at the {row}"
    return rng.choice((f"in the {row} {col}", f"in the {row} {col} corner"))


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _join(parts: list[str], rng: random.Random) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + rng.choice((" and ", ", and ")) + parts[-1]


def _classic(scene: dict, rng: random.Random, template: int | None) -> str:
    objs = list(scene["objects"])
    rng.shuffle(objs)  # mention order must not give away the layout
    size = lambda o: rng.choice(SIZE_WORDS[o["size"]])
    plain = [f"a {size(o)} {o['colour']} {o['shape']}" for o in objs]
    placed = [f"{p} {_where(o, rng)}" for p, o in zip(plain, objs, strict=True)]
    n = len(objs)
    count = f"{COUNT_WORDS[n - 1]} {rng.choice(('shape', 'object'))}{'s' if n > 1 else ''}"
    bg = f"a {rng.choice(('', 'plain '))}{scene['background']} background"
    patterns = (
        lambda: _join(plain, rng),
        lambda: _join(placed, rng),
        lambda: f"{count}: {_join(placed, rng)}",
        lambda: f"a photo of {count}: {_join(plain, rng)}",
        lambda: f"{_join(plain, rng)} on {bg}",
        lambda: f"an image with {count} on {bg}: {_join(placed, rng)}",
        lambda: " ".join(f"there is {p}." for p in placed),
        lambda: _join([f"{_a(o['colour'])} {o['shape']} that is {size(o)}" for o in objs], rng),
        lambda: "; ".join(f"{_where(o, rng)}, {p}" for p, o in zip(plain, objs, strict=True)),
        lambda: f"a simple drawing of {_join(plain, rng)}",
        lambda: f"a picture of {_join(placed, rng)}, {count} in total",
    )
    return patterns[rng.randrange(len(patterns)) if template is None else template]()


def _small(scene: dict, rng: random.Random, template: int | None) -> str:
    objs = list(scene["objects"])
    rng.shuffle(objs)  # mention order must not give away the layout
    named = " and ".join(f"a {o['size']} {o['colour']} {o['shape']}" for o in objs)
    n = len(objs)
    # few words besides the attributes: a word no picture can tell (which pattern) is noise in the
    # vocabulary head's targets, and a rare one weighs a lot there (IDF)
    patterns = (
        lambda: named,
        lambda: f"a photo of {named}",
        lambda: f"{COUNT_WORDS[n - 1]} shape{'s' if n > 1 else ''}: {named}",
    )
    return patterns[rng.randrange(len(patterns)) if template is None else template]()


_CAPTIONERS = {"classic": (_classic, 11), "small": (_small, 3), "primary": (_small, 3)}
TEMPLATES = {style: n for style, (_, n) in _CAPTIONERS.items()}
"""Number of sentence patterns of each style."""
N_TEMPLATES = TEMPLATES["classic"]


def caption_scene(
    scene: dict, rng: random.Random, template: int | None = None, style: str = "classic"
) -> str:
    """A caption of ``scene`` in ``style``'s wording, naming every object's size, colour and shape.

    ``template`` picks one of ``TEMPLATES[style]`` sentence patterns; by default one is drawn from ``rng``.
    """
    return _CAPTIONERS[style][0](scene, rng, template)
