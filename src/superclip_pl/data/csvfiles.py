"""CSV / TSV files of image paths and captions (open_clip's `csv` format) as a streaming HF data set.

HF's `csv` builder streams rows with unknown features (so they cannot be read undecoded), stops a
file at its first malformed row, and leaves image paths as written. Here HF still resolves the
files (`load_dataset_builder`: local globs, hub repositories, remote URLs) and opens them (`xopen`),
but the rows are read by Python's `csv` module:
- a relative image path is read relative to the CSV file's own directory (as HF's `imagefolder`
  reads its metadata file's `file_name`), so a CSV beside its images works from any directory;
  absolute paths and URLs are taken as written;
- a row whose fields do not match the header (a separator inside an unquoted caption) or that the
  reader rejects is handed on as a bad row, skipped and counted (`bad_row`), and the file goes on;
- the separator is the source's `separator`, else the file's extension decides (`.tsv`/`.tab`: a
  tab, else a comma).
The rows of every file are dealt out over `parts` (ranks x DataLoader workers): each worker reads
the text of every file and keeps its share of the rows, so one CSV feeds all ranks and workers
evenly (reading text is cheap next to decoding the images it names).
"""

from __future__ import annotations

import csv
import os
import posixpath
from collections.abc import Iterator, Sequence
from itertools import islice

import datasets
from datasets.download import DownloadConfig
from datasets.utils.file_utils import xopen

BAD_ROW = "__bad_row__"  # the field that marks a row the decoder counts as `bad_row`
SEPARATORS = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|"}


def separator_of(url: str, given: str | None, role: str = "train") -> str:
    """The one-character separator of the file `url`: `given` (or its name: tab, comma, ...), else
    a tab for `.tsv` / `.tab` files and a comma for the others."""
    if given is None:
        return "\t" if url.lower().endswith((".tsv", ".tab")) else ","
    separator = SEPARATORS.get(given.lower(), given)
    if len(separator) != 1 or separator in '"\r\n':
        raise ValueError(
            f"data.{role}.separator: {given!r} must be one character, e.g. ',' or a tab ('\\t' in YAML "
            "double quotes, or the word tab)"
        )
    return separator


def resolve(path: str, base: str) -> str:
    """`path` as written when absolute or a URL, else joined to `base` (the CSV file's directory)."""
    path = path.strip()
    if not path or "://" in path or os.path.isabs(path):
        return path
    return posixpath.join(base, path) if "://" in base else os.path.join(base, path)


def _base(url: str) -> str:
    return posixpath.dirname(url) if "://" in url else os.path.dirname(url)


def _header(reader, url: str, separator: str, role: str) -> list[str]:
    """The column names of the file (stripped), or one line when a wrong separator made them one."""
    header = [name.strip() for name in next(reader, [])]
    others = [s for s in ("\t", ",", ";", "|") if s != separator]
    if len(header) == 1 and (hint := next((s for s in others if s in header[0]), None)):
        raise ValueError(
            f"data.{role}.separator: the header of {url} reads as one column {header[0]!r} with "
            f"{separator!r} between columns; it looks separated by {hint!r}: set data.{role}.separator "
            f"to {'tab' if hint == chr(9) else repr(hint)}"
        )
    return header


def csv_rows(
    shards: Sequence[tuple[str, int]],
    parts: int = 1,
    fields: tuple[str, ...] | None = None,
    images: tuple[str, ...] = (),
    separator: str | None = None,
    download_config: DownloadConfig | None = None,
    role: str = "train",
) -> Iterator[dict]:
    """Rows `{column: text}` of the shards `(file, part)`: the file's rows numbered i with
    i % parts == part, keeping `fields` (None: all), with the `images` columns' paths resolved."""
    for url, part in shards:
        base, sep = _base(url), separator_of(url, separator, role)
        with xopen(url, "r", encoding="utf-8-sig", newline="", download_config=download_config) as f:
            reader = csv.reader(f, delimiter=sep)
            header = _header(reader, url, sep, role)
            keep = [(i, name) for i, name in enumerate(header) if fields is None or name in fields]
            index = -1
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as err:  # e.g. a field over csv.field_size_limit(): this row only
                    row = err
                if row == []:  # a blank line is no row
                    continue
                index += 1
                if index % parts != part:
                    continue
                if isinstance(row, csv.Error) or len(row) != len(header):
                    yield {BAD_ROW: f"{url}:{reader.line_num}"}
                    continue
                example = {name: row[i] for i, name in keep}
                for column in images:
                    if example.get(column):
                        example[column] = resolve(example[column], base)
                yield example


def first_rows(
    urls: list[str], separator: str | None, role: str, config: DownloadConfig | None, n: int = 100
) -> list[dict]:
    """Up to `n` rows with all their columns from the first files (at most 4): they tell the columns.
    A bad separator or a header that looks separated by another character is one line, here."""
    first: list[dict] = []
    for url in urls[:4]:
        rows = csv_rows([(url, 0)], 1, None, (), separator, config, role)
        first += islice((r for r in rows if BAD_ROW not in r), n - len(first))
        if len(first) >= n:
            break
    return first


def check_first_images(urls: list[str], first: list[dict], images: tuple[str, ...], role: str) -> None:
    """One line when not one of the first rows' local image files exists (paths written relative to
    another directory), where a few missing files would only be skipped and counted."""
    base = _base(urls[0])
    cells = (next((r[c] for c in images if r.get(c)), None) for r in first)  # a row's image: its first
    written = [c for c in cells if c and "://" not in c]
    if written and not any(os.path.isfile(resolve(p, base)) for p in written):
        raise ValueError(
            f"data.{role}.image_column: no image of the first {len(written)} rows of {urls[0]} is a file, "
            f"e.g. {written[0]!r} -> {resolve(written[0], base)}; write paths absolute or relative to "
            "the CSV file's directory"
        )


def csv_dataset(
    urls: list[str],
    fields: list[str],
    images: tuple[str, ...],
    parts: int,
    separator: str | None,
    config: DownloadConfig | None,
    role: str,
) -> datasets.IterableDataset:
    """The streaming data set over the files `urls`, as `len(urls) * parts` shards (file, part)."""
    return datasets.IterableDataset.from_generator(
        csv_rows,  # HF shards over the one list in gen_kwargs
        gen_kwargs={
            "shards": [(url, part) for url in urls for part in range(parts)],
            "parts": parts,
            "fields": tuple(fields),
            "images": images,
            "separator": separator,
            "download_config": config,
            "role": role,
        },
    )
