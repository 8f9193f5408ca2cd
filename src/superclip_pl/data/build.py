"""A source (or a list of weighted sources) -> the stream a rank reads from it: opened, its columns
resolved, decoded, split over ranks (and, by HF, over DataLoader workers), mixed when several."""

from __future__ import annotations

from datasets.distributed import split_dataset_by_node
from lightning.pytorch.utilities import rank_zero_warn

from superclip_pl.data import jpeg
from superclip_pl.data.columns import columns_found, resolve_columns
from superclip_pl.data.decode import SampleDecoder
from superclip_pl.data.mixture import MixtureStream, source_names
from superclip_pl.data.sources import DataSource, open_source, sharding_advice
from superclip_pl.data.stream import ImageTextStream
from superclip_pl.transforms import eval_transform, train_transform


def image_text_stream(
    source: DataSource,
    *,
    image_size: int = 224,
    training: bool = True,
    rank: int = 0,
    world_size: int = 1,
    shuffle_buffer: int = 0,
    seed: int = 0,
    infinite: bool | None = None,
    max_image_pixels: int = 2**25,
    role: str = "train",
    normalized: bool = True,
    source_index: int = 0,
    jpeg_decoder: str = "auto",
    num_workers: int = 0,
) -> ImageTextStream:
    """The stream of decoded samples that rank `rank` of `world_size` reads from `source`.

    Opens the source and reads its first examples now, so that a missing path or a wrong column
    fails here with a one-line message rather than later inside a DataLoader worker. `training`
    selects the random-crop transform and a random caption (column) among several; `infinite`
    defaults to it. `normalized=False` yields uint8 images (the data module normalises them on the
    device); `source_index` is the source's place in a mixture; `jpeg_decoder` (auto, pil, opencv)
    how training decodes JPEGs; `num_workers` the DataLoader workers per rank (a CSV's rows are dealt
    out over ranks x workers).
    """
    opened = open_source(source, role)
    if not opened.first:
        raise ValueError(f"data.{role}: {source.describe()} has no example")
    columns = resolve_columns(columns_found(opened.first), source, role, schema_less=opened.schema_less)
    opened.check(columns.images)
    make = train_transform if training else eval_transform
    decoder = SampleDecoder(
        columns,
        make(image_size, normalized=normalized),
        max_image_pixels,
        random_caption=training,
        draft=image_size if training else None,
        source=source.name,
        opencv=training and jpeg_decoder != "pil" and jpeg.available(),
    )
    selected = opened.select(columns, world_size * max(num_workers, 1))
    ours = split_dataset_by_node(selected, rank=rank, world_size=world_size)
    return ImageTextStream(
        ours,
        decoder,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        infinite=training if infinite is None else infinite,
        rank=rank,
        source_shards=selected.num_shards,
        source_index=source_index,
    )


def role_stream(
    source: DataSource | list[DataSource],
    role: str,
    *,
    training: bool,
    rank: int,
    world_size: int,
    num_workers: int,
    **options,
) -> tuple[ImageTextStream | MixtureStream, list[str | None]]:
    """(the stream of `role`, its sources' names): one source's stream, or the mixture of a list's.

    Images come out as uint8 (the data module normalises them on the device). `options` are those
    of `image_text_stream`; a warning names each source whose shards split unevenly.
    """
    sources = source if isinstance(source, list) else [source]
    if not sources:
        raise ValueError(f"data.{role}: an empty list of sources; give at least one")
    names, weights = source_names(sources, role)
    where = [role] if len(sources) == 1 else [f"{role}[{i}]" for i in range(len(sources))]
    streams = [
        image_text_stream(
            s,
            training=training,
            rank=rank,
            world_size=world_size,
            role=where[i],
            normalized=False,
            source_index=i,
            num_workers=num_workers,
            **options,
        )
        for i, s in enumerate(sources)
    ]
    for stream, key in zip(streams, where, strict=True):
        if advice := sharding_advice(stream.source_shards, world_size, num_workers):
            rank_zero_warn(f"data.{key}: {advice}")
    if len(streams) == 1:
        return streams[0], names
    return MixtureStream(streams, names, weights, options.get("seed", 0), rank), names
