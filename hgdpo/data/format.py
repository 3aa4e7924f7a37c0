"""The hgdpo preference-dataset formats and what their readers and writers share.

Depends only on the standard library. :mod:`hgdpo.data.writers` writes the triplet layout,
:mod:`hgdpo.data.readers` reads both layouts, :mod:`hgdpo.data.pickapic` converts the first to the second.

Triplet dataset format (``format_version`` 1, written by ``TripletWriter``)
------------------------------------------------------------------------------

A directory::

    my_dataset/
        index.parquet
        images/0000/000000_win.png
        images/0000/000000_lose.png
        images/0000/000001_win.png
        ...

``index.parquet`` has one row per preference pair:

==============  ==================  ==========================================
column          type                meaning
==============  ==================  ==========================================
``prompt``      string              the text prompt (never empty)
``win_image``   string              winner image path, relative to the
                                    dataset directory, ``/``-separated
``lose_image``  string              loser image path, same convention
``win_score``   float64             scorer value of the winner
``lose_score``  float64             scorer value of the loser
``scores``      list<float64>       *optional*: scores of all N images of the
                                    candidate pool the pair was picked from
``win_seed``    int64               *optional*: sampling seed of the winner
``lose_seed``   int64               *optional*: sampling seed of the loser
==============  ==================  ==========================================

Optional columns may be absent or null per row.  Image files are PNG by
default (JPEG is also supported by the writer; the reader accepts anything
Pillow decodes).  The image sub-directory layout is not part of the format:
readers must only use the paths stored in the index.

Dataset-level metadata lives in the parquet *schema metadata* under the key
``hgdpo`` as a JSON object.  ``format_version`` (int, currently 1) is required;
``pool_size`` (int), ``scorer`` (str), ``model`` (str) are optional.  The writer
also stores ``image_format``, ``num_pairs``, ``complete`` (false when the writer
was closed by an exception or by ``TripletWriter.flush``), ``created_by``
and any ``extra_metadata`` the caller passed.  A parquet file with the triplet
columns but without ``hgdpo`` metadata is read as version 1 with unknown
pool size / scorer / model.  A newer ``format_version`` is refused.

Pick-a-Pic v2 style parquet
---------------------------

One ``.parquet`` file, or a directory of ``*.parquet`` shards (read in sorted
file-name order), with columns ``caption`` (string), ``jpg_0``, ``jpg_1``
(encoded image bytes: ``binary`` or a Hugging Face ``Image`` struct with a
``bytes`` field), ``label_0`` (float) and optionally ``label_1`` (ignored).
``label_0 == 1`` means ``jpg_0`` won, ``label_0 == 0`` means ``jpg_1`` won; any
other value (0.5 ties, nulls) is dropped and counted as a tie.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hgdpo.fileio import image_inside

__all__ = [
    "FORMAT_VERSION",
    "INDEX_FILENAME",
    "METADATA_KEY",
    "TRIPLET_COLUMNS",
    "CorruptImageError",
    "PreferenceDatasetInfo",
    "resolve_dataset_path",
]

FORMAT_VERSION = 1
INDEX_FILENAME = "index.parquet"
METADATA_KEY = "hgdpo"
#: The triplet index's columns, in order (the last three are optional).
TRIPLET_COLUMNS = ("prompt", "win_image", "lose_image", "win_score", "lose_score", "scores", "win_seed", "lose_seed")


class CorruptImageError(ValueError):
    """An image of a preference pair is missing, undecodable or truncated.

    Attributes:
        index: the dataset item index (after filtering).
        source: where the image came from: a file path, or e.g.
            ``"jpg_0 of row 12 in train-0001.parquet"``.
        reason: why loading failed.
    """

    def __init__(self, index: int, source: str, reason: str) -> None:
        super().__init__(index, source, reason)
        self.index = index
        self.source = source
        self.reason = reason

    def __str__(self) -> str:
        return f"item {self.index}: cannot load image {self.source}: {self.reason}"


@dataclass(frozen=True)
class PreferenceDatasetInfo:
    """Summary of an opened preference dataset."""

    source: str
    kind: Literal["triplets", "pickapic"]
    pool_size: int | None
    scorer: str | None
    model: str | None
    num_pairs: int
    dropped_ties: int
    dropped_empty_captions: int
    dropped_not_people: int


def resolve_dataset_path(root: str | Path, value: Any) -> Path:
    """The file a dataset's relative image path names, or ValueError when it is not a safe image path.

    ``value`` must be a non-empty relative ``/``-separated path with an image suffix
    (:data:`hgdpo.fileio.IMAGE_SUFFIXES`) that stays inside ``root`` once every ``..`` and symbolic link is
    resolved: ``/etc/passwd``, ``../x.png``, ``C:\\x.png`` or a link out of the folder are refused.
    """
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise ValueError(f"image path {value!r} is empty or not text; write a path relative to the dataset folder")
    if Path(value).is_absolute() or value.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", value):
        raise ValueError(f"image path {value!r} is absolute; write it relative to the dataset folder")
    if ".." in re.split(r"[/\\]", value):
        raise ValueError(f"image path {value!r} leaves the dataset folder ('..'); keep images inside it")
    return image_inside(root, value, f"image path {value!r}", "the dataset folder",
                        "a symbolic link? keep the images inside it")
