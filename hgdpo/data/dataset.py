"""Preference (win/lose pair) datasets for HG-DPO training.

This module is part of the core library: it depends only on the standard
library, numpy, pyarrow and Pillow (no torch import is needed; a
:class:`PreferenceDataset` is a plain map-style dataset that any
``torch.utils.data.DataLoader`` accepts).

Two on-disk layouts can be read with :func:`open_preference_dataset`.

Triplet dataset format (``format_version`` 1, written by :class:`TripletWriter`)
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
was closed by an exception or by :meth:`TripletWriter.flush`), ``created_by``
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
other value (0.5 ties, nulls) is dropped and counted as a tie.  Only the small
columns are read when opening; image bytes are streamed on demand in batches of a
few rows (``iter_batches``, memory-mapped) and kept in a small LRU cache, so neither a
large shard nor one huge row group is ever held in memory whole.

Filtering
---------

Rows are dropped (and counted in :class:`PreferenceDatasetInfo`) in this order,
each row counted once under the first rule that drops it: ties (Pick-a-Pic
only), empty or whitespace-only prompt/caption, and with ``people_only=True``
prompts that :func:`is_about_people` rejects.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import math
import operator
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from hgdpo.fileio import atomic_path, atomic_write_bytes

__all__ = [
    "FORMAT_VERSION",
    "INDEX_FILENAME",
    "METADATA_KEY",
    "PEOPLE_WORDS",
    "NON_PEOPLE_PHRASES",
    "CorruptImageError",
    "PreferenceDatasetInfo",
    "PreferenceDataset",
    "TripletWriter",
    "export_pickapic",
    "is_about_people",
    "open_preference_dataset",
    "resolve_dataset_path",
    "write_triplet_index",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX_FILENAME = "index.parquet"
METADATA_KEY = "hgdpo"

_TRIPLET_REQUIRED = ("prompt", "win_image", "lose_image")
_PICKAPIC_REQUIRED = ("caption", "jpg_0", "jpg_1", "label_0")
_LAYOUTS_HELP = (
    "expected either the hgdpo triplet layout (prompt, win_image, lose_image, "
    "win_score, lose_score[, scores, win_seed, lose_seed]) or the Pick-a-Pic v2 "
    "layout (caption, jpg_0, jpg_1, label_0[, label_1])"
)


# --------------------------------------------------------------------------
# errors and info
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# people filter
# --------------------------------------------------------------------------

#: Words whose presence (as a whole word, case-insensitive) marks a caption as
#: being about people.  Plurals are listed explicitly.  A word may be preceded
#: by digits so booru-style tags such as ``1girl`` / ``2boys`` match, and
#: underscores count as spaces (``long_hair,_1girl``).  Because matching is on
#: word boundaries, ``man`` does not match ``mango``/``woman``/``snowman`` and
#: ``human`` does not match ``inhuman``/``humanoid``/``superhuman`` (those are
#: deliberately *not* people).  Known false positives that were accepted for
#: recall: ``baby dragon``, ``cat face``, ``portrait of a dog``, ``king``/``queen``
#: in names of things not covered by :data:`NON_PEOPLE_PHRASES`, and pronouns
#: used for animals ("a cat and her kittens").
PEOPLE_WORDS: tuple[str, ...] = (
    # generic
    "person", "persons", "people", "human", "humans", "someone", "somebody",
    "man", "men", "woman", "women", "boy", "boys", "girl", "girls",
    "child", "children", "kid", "kids", "baby", "babies", "toddler", "toddlers",
    "infant", "infants", "teen", "teens", "teenager", "teenagers",
    "adult", "adults", "lady", "ladies", "guy", "guys", "gentleman", "gentlemen",
    "crowd", "crowds", "tourist", "tourists",
    # depictions of a person
    "portrait", "portraits", "selfie", "selfies", "headshot", "headshots",
    "face", "faces",
    # relations
    "couple", "couples", "family", "families", "mother", "mothers", "father",
    "fathers", "mom", "moms", "dad", "dads", "parent", "parents", "wife", "wives",
    "husband", "husbands", "bride", "brides", "groom", "grooms", "son", "sons",
    "daughter", "daughters", "brother", "brothers", "sister", "sisters",
    "grandmother", "grandfather", "grandma", "grandpa", "friends",
    # occupations and roles
    "soldier", "soldiers", "doctor", "doctors", "nurse", "nurses",
    "policeman", "policemen", "policewoman", "firefighter", "firefighters",
    "chef", "chefs", "teacher", "teachers", "student", "students",
    "worker", "workers", "farmer", "farmers", "astronaut", "astronauts",
    "scientist", "scientists", "businessman", "businessmen", "businesswoman",
    "athlete", "athletes", "dancer", "dancers", "singer", "singers",
    "musician", "musicians", "actor", "actors", "actress", "actresses",
    "cowboy", "cowboys", "cowgirl", "cowgirls", "samurai", "ninja", "ninjas",
    "knight", "knights", "warrior", "warriors", "king", "kings", "queen", "queens",
    "prince", "princes", "princess", "princesses", "wizard", "wizards",
    "witch", "witches", "pirate", "pirates", "viking", "vikings", "monk", "monks",
    "priest", "priests", "nun", "nuns", "sailor", "sailors", "detective",
    "detectives", "superhero", "superheroes",
    # pronouns
    "he", "she", "him", "his", "her", "hers", "himself", "herself",
)

#: Phrases removed from a caption before matching :data:`PEOPLE_WORDS`, because
#: they contain a people word without being about people.  Matched
#: case-insensitively on word boundaries.
NON_PEOPLE_PHRASES: tuple[str, ...] = (
    "man-made", "man made", "man-eating", "pac-man", "pacman", "snow man",
    "gingerbread man", "gingerbread men",
    "king size", "king sized", "queen size", "queen sized",
    "queen bee", "queen bees", "king cobra", "king cobras", "king crab",
    "king crabs", "king penguin", "king penguins", "lion king",
    "couple of", "clock face", "watch face", "rock face", "cliff face",
)

_PEOPLE_SET = frozenset(PEOPLE_WORDS)
_WORD_RE = re.compile(r"\w+")
_NON_PEOPLE_RE = re.compile(
    r"\b(?:"
    + "|".join(
        sorted((re.escape(p).replace(r"\ ", r"\s+") for p in NON_PEOPLE_PHRASES), key=len, reverse=True)
    )
    + r")\b",
    re.IGNORECASE,
)


def _has_people_word(text: str) -> bool:
    # Equivalent to the regex \b\d*(?:word|...)\b on lower-cased text, but
    # ~10x faster: a match is exactly a maximal \w run equal to digits + word.
    for token in _WORD_RE.findall(text):
        if token in _PEOPLE_SET:
            return True
        if token[0].isdigit() and token.lstrip("0123456789") in _PEOPLE_SET:
            return True
    return False


def is_about_people(caption: str) -> bool:
    """Whether ``caption`` is about people (the paper's "(H)" human-only subset).

    True when, after removing :data:`NON_PEOPLE_PHRASES` and treating ``_`` as a
    space, any word of :data:`PEOPLE_WORDS` occurs as a whole word
    (case-insensitive, optionally prefixed by digits as in ``1girl``).
    """
    if not caption:
        return False
    text = caption.replace("_", " ").lower()
    if not _has_people_word(text):
        return False
    return _has_people_word(_NON_PEOPLE_RE.sub(" ", text))


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------


class _LRU:
    """A tiny LRU cache bounded by entry count and (optionally) total size."""

    def __init__(self, max_items: int, max_bytes: int | None = None) -> None:
        self.max_items = max(1, max_items)
        self.max_bytes = max_bytes
        self._data: collections.OrderedDict[Any, tuple[Any, int]] = collections.OrderedDict()
        self._bytes = 0

    def get(self, key: Any) -> Any:
        item = self._data.get(key)
        if item is None:
            return None
        self._data.move_to_end(key)
        return item[0]

    def put(self, key: Any, value: Any, nbytes: int = 0) -> None:
        if key in self._data:
            self._bytes -= self._data.pop(key)[1]
        self._data[key] = (value, nbytes)
        self._bytes += nbytes
        while len(self._data) > 1 and (
            len(self._data) > self.max_items or (self.max_bytes is not None and self._bytes > self.max_bytes)
        ):
            _, (_, old) = self._data.popitem(last=False)
            self._bytes -= old

    def clear(self) -> None:
        self._data.clear()
        self._bytes = 0


#: Largest image (width x height) a dataset may hold: 40 megapixels, far below Pillow's decompression-bomb
#: limit (~179 MP, 0.5 GB decoded); larger images are refused from their header, before decoding.
MAX_IMAGE_PIXELS = 40_000_000
#: File suffixes a triplet index may point to.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def resolve_dataset_path(root: str | Path, value: Any) -> Path:
    """The file a dataset's relative image path names, or ValueError when it is not a safe image path.

    ``value`` must be a non-empty relative ``/``-separated path with an image suffix
    (:data:`IMAGE_SUFFIXES`) that stays inside ``root`` once every ``..`` and symbolic link is
    resolved: ``/etc/passwd``, ``../x.png``, ``C:\\x.png`` or a link out of the folder are refused.
    """
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise ValueError(f"image path {value!r} is empty or not text; write a path relative to the dataset folder")
    if Path(value).is_absolute() or value.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", value):
        raise ValueError(f"image path {value!r} is absolute; write it relative to the dataset folder")
    if ".." in re.split(r"[/\\]", value):
        raise ValueError(f"image path {value!r} leaves the dataset folder ('..'); keep images inside it")
    if Path(value).suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"image path {value!r} is not an image file ({', '.join(IMAGE_SUFFIXES)})")
    base = Path(root).resolve()
    path = (base / value).resolve()
    if path != base and base not in path.parents:
        raise ValueError(f"image path {value!r} resolves to {path}, outside the dataset folder {base} (a symbolic "
                         "link?); keep images inside it")
    return path


def _decode_image(data: Any, index: int, source: str) -> Image.Image:
    """Fully decode image bytes (or a binary file object) to an RGB PIL image or raise CorruptImageError.

    The size is checked from the header first: images over :data:`MAX_IMAGE_PIXELS` are refused undecoded.
    """
    if data is None:
        raise CorruptImageError(index, source, "no image bytes (null)")
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            raise CorruptImageError(index, source, "empty image data (0 bytes)")
        data = io.BytesIO(data)
    elif not hasattr(data, "read"):
        raise CorruptImageError(index, source, f"expected encoded image bytes, got {type(data).__name__}")
    try:
        im = Image.open(data)
    except Exception as exc:  # Pillow raises many types for bad data
        raise CorruptImageError(index, source, f"{type(exc).__name__}: {exc}") from exc
    width, height = im.size
    if width * height > MAX_IMAGE_PIXELS:
        raise CorruptImageError(index, source, f"{width}x{height} = {width * height} pixels, over the limit of "
                                f"{MAX_IMAGE_PIXELS}; downscale it (e.g. to 1024 px on the long side)")
    try:
        im.load()  # decode everything now so truncated data fails here
        if im.mode != "RGB":
            im = im.convert("RGB")
    except Exception as exc:
        raise CorruptImageError(index, source, f"{type(exc).__name__}: {exc}") from exc
    return im


class _Hasher:
    """sha256 over length-prefixed parts (unambiguous concatenation)."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def add(self, *parts: Any) -> None:
        for part in parts:
            if isinstance(part, (bytes, bytearray, memoryview)):
                raw = bytes(part)
            else:
                raw = str(part).encode("utf-8", "surrogatepass")
            self._h.update(len(raw).to_bytes(8, "little"))
            self._h.update(raw)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def _keep_mask(
    prompts: Sequence[str | None], candidate: np.ndarray, people_only: bool
) -> tuple[np.ndarray, int, int]:
    """Apply the empty-prompt and people filters to rows where ``candidate`` is True.

    Returns (keep mask, dropped empty, dropped not-people).
    """
    keep = candidate.copy()
    dropped_empty = 0
    dropped_people = 0
    for i, p in enumerate(prompts):
        if not keep[i]:
            continue
        if p is None or not p.strip():
            keep[i] = False
            dropped_empty += 1
        elif people_only and not is_about_people(p):
            keep[i] = False
            dropped_people += 1
    return keep, dropped_empty, dropped_people


def _read_metadata(schema: pa.Schema) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(METADATA_KEY.encode())
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"invalid JSON in parquet schema metadata key {METADATA_KEY!r}: {exc}") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"parquet schema metadata key {METADATA_KEY!r} must hold a JSON object")
    return meta


def _layout_of(names: Sequence[str]) -> Literal["triplets", "pickapic"] | None:
    cols = set(names)
    if all(c in cols for c in _TRIPLET_REQUIRED):
        return "triplets"
    if all(c in cols for c in _PICKAPIC_REQUIRED):
        return "pickapic"
    return None


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def _opt_str(v: Any) -> str | None:
    return None if v is None else str(v)


# --------------------------------------------------------------------------
# the dataset
# --------------------------------------------------------------------------


class PreferenceDataset:
    """A map-style dataset of (prompt, winner image, loser image) pairs.

    Create with :func:`open_preference_dataset`.  ``ds[i]`` returns
    ``{"index": i, "prompt": str, "win": PIL.Image, "lose": PIL.Image}`` with RGB
    images; negative indices count from the end.  Instances are picklable (for
    DataLoader worker processes); open file handles and caches are dropped on
    pickling and re-created lazily (also after ``fork``).  Not thread-safe.
    """

    kind: Literal["triplets", "pickapic"]

    def __init__(self) -> None:  # pragma: no cover - use open_preference_dataset
        raise TypeError("use open_preference_dataset() to open a PreferenceDataset")

    # Set by subclasses: self.info, self.metadata, self.people_only, self._rows (pa.Table)
    info: PreferenceDatasetInfo
    #: Dataset-level metadata dict (the ``hgdpo`` JSON for triplets, {} for Pick-a-Pic).
    metadata: dict[str, Any]
    people_only: bool
    _rows: pa.Table

    def __len__(self) -> int:
        return self._rows.num_rows

    def __repr__(self) -> str:
        i = self.info
        return f"PreferenceDataset(kind={i.kind!r}, source={i.source!r}, num_pairs={i.num_pairs})"

    def _index(self, i: int) -> int:
        i = operator.index(i)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for dataset of {n} pairs")
        return i

    def prompt(self, i: int) -> str:
        """The prompt (caption) of pair ``i``."""
        return self._rows.column("prompt")[self._index(i)].as_py()

    def load_pair(self, i: int) -> tuple[Image.Image, Image.Image]:
        """Fully decoded RGB (winner, loser) images of pair ``i``.

        Raises:
            CorruptImageError: an image is missing, undecodable or truncated.
        """
        raise NotImplementedError

    def image_sources(self, i: int) -> tuple[str, str]:
        """Human-readable (winner, loser) image sources of pair ``i``."""
        raise NotImplementedError

    def item_metadata(self, i: int) -> dict[str, Any]:
        """Per-pair metadata that is not needed for training (scores, seeds, labels)."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Stable 16-hex-char hash of what determines the training data.

        Covers the kind, ``people_only``, the kept rows' prompts and the image
        identities (triplets: relative path, size and mtime_ns of each image
        file; Pick-a-Pic: name, size and mtime_ns of each shard plus the kept
        row indices).  Computed fresh on each call from file metadata only (no
        image is read or decoded); a missing image file hashes as missing.
        """
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = self._index(i)
        win, lose = self.load_pair(i)
        return {"index": i, "prompt": self.prompt(i), "win": win, "lose": lose}


class _TripletDataset(PreferenceDataset):
    kind = "triplets"

    def __init__(self, index_path: Path, source: str, people_only: bool) -> None:
        self.root = index_path.parent
        table = pq.read_table(index_path, memory_map=True)
        meta = _read_metadata(table.schema)
        version = meta.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"{index_path}: hgdpo triplet format_version {version!r} is not supported "
                f"(this hgdpo reads up to {FORMAT_VERSION}); upgrade hgdpo"
            )
        if meta.get("complete") is False:
            logger.warning(
                "%s: the writer did not finish this dataset (complete=false); it may be partial", index_path
            )
        prompts = table.column("prompt").to_pylist()
        keep, d_empty, d_people = _keep_mask(prompts, np.ones(len(prompts), dtype=bool), people_only)
        if d_empty:
            logger.warning("%s: dropped %d rows with an empty prompt", index_path, d_empty)
        if d_people:
            logger.info("%s: people_only dropped %d rows not about people", index_path, d_people)
        self._rows = table.filter(pa.array(keep)).combine_chunks()
        self.metadata = meta
        self.people_only = people_only
        self.info = PreferenceDatasetInfo(
            source=source,
            kind="triplets",
            pool_size=_opt_int(meta.get("pool_size")),
            scorer=_opt_str(meta.get("scorer")),
            model=_opt_str(meta.get("model")),
            num_pairs=self._rows.num_rows,
            dropped_ties=0,
            dropped_empty_captions=d_empty,
            dropped_not_people=d_people,
        )

    def _paths(self, i: int) -> tuple[str, str]:
        return (
            self._rows.column("win_image")[i].as_py(),
            self._rows.column("lose_image")[i].as_py(),
        )

    def _resolved(self, i: int, rel: Any) -> Path:
        """The image file of index path ``rel`` of pair ``i``; CorruptImageError for an unsafe path."""
        if rel is None:
            raise CorruptImageError(i, "(null path)", "image path is null in the index")
        try:
            return resolve_dataset_path(self.root, rel)
        except ValueError as exc:
            raise CorruptImageError(i, f"{rel!r} of {self.root / INDEX_FILENAME}", str(exc)) from None

    def image_sources(self, i: int) -> tuple[str, str]:
        """The two image files, checked to lie inside the dataset (CorruptImageError otherwise)."""
        i = self._index(i)
        w, l = self._paths(i)
        return str(self._resolved(i, w)), str(self._resolved(i, l))

    def load_pair(self, i: int) -> tuple[Image.Image, Image.Image]:
        i = self._index(i)
        out = []
        for rel in self._paths(i):
            path = self._resolved(i, rel)
            try:
                with open(path, "rb") as handle:
                    out.append(_decode_image(handle, i, str(path)))
            except OSError as exc:
                why = "file not found" if isinstance(exc, FileNotFoundError) else f"{type(exc).__name__}: {exc}"
                raise CorruptImageError(i, str(path), why) from exc
        return out[0], out[1]

    def item_metadata(self, i: int) -> dict[str, Any]:
        i = self._index(i)
        names = self._rows.column_names
        result: dict[str, Any] = {}
        for key in ("win_score", "lose_score", "scores", "win_seed", "lose_seed", "win_image", "lose_image"):
            result[key] = self._rows.column(key)[i].as_py() if key in names else None
        return result

    def fingerprint(self) -> str:
        h = _Hasher()
        h.add("hgdpo-fingerprint-v1", self.kind, f"people_only={self.people_only}")
        prompts = self._rows.column("prompt").to_pylist()
        wins = self._rows.column("win_image").to_pylist()
        loses = self._rows.column("lose_image").to_pylist()
        for p, w, l in zip(prompts, wins, loses):
            h.add(p)
            for rel in (w, l):
                try:
                    st = os.stat(self.root / rel)
                    h.add(rel, st.st_size, st.st_mtime_ns)
                except (OSError, TypeError):
                    h.add(rel, "missing")
        return h.hexdigest()[:16]


@dataclass
class _Shard:
    path: Path
    rg_starts: np.ndarray  # first row of each row group, ascending
    has_label_1: bool


class _PickapicDataset(PreferenceDataset):
    kind = "pickapic"

    #: Rows of image bytes read at once (a row group is streamed in batches of this many rows).
    batch_rows = 16
    #: Batches of image bytes kept in memory per process (bounded by count and bytes).
    cache_batches = 8
    cache_bytes = 1 << 28

    def __init__(self, files: list[Path], source: str, people_only: bool) -> None:
        shards: list[_Shard] = []
        parts: list[pa.Table] = []
        d_ties = d_empty = d_people = 0
        for shard_id, path in enumerate(files):
            pf = pq.ParquetFile(path, memory_map=True)
            schema = pf.schema_arrow
            for col in ("jpg_0", "jpg_1"):
                t = schema.field(col).type
                ok = (
                    pa.types.is_binary(t)
                    or pa.types.is_large_binary(t)
                    or (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0)
                )
                if not ok:
                    raise ValueError(
                        f"{path}: column {col!r} has type {t}; expected binary image bytes "
                        "(or a struct with a 'bytes' field)"
                    )
            md = pf.metadata
            sizes = [md.row_group(k).num_rows for k in range(md.num_row_groups)]
            starts = np.cumsum([0] + sizes[:-1], dtype=np.int64) if sizes else np.zeros(0, dtype=np.int64)
            shards.append(_Shard(path, starts, "label_1" in schema.names))

            small = pf.read(columns=["caption", "label_0"])
            label = pc.cast(small.column("label_0"), pa.float64()).fill_null(float("nan"))
            label_np = label.to_numpy()
            winner = np.where(label_np == 1.0, 0, np.where(label_np == 0.0, 1, -1)).astype(np.int8)
            decided = winner >= 0
            ties = int((~decided).sum())
            captions = small.column("caption").to_pylist()
            keep, e, p = _keep_mask(captions, decided, people_only)
            d_ties += ties
            d_empty += e
            d_people += p
            kept_rows = np.nonzero(keep)[0].astype(np.int64)
            parts.append(
                pa.table(
                    {
                        "prompt": pa.array([captions[r] for r in kept_rows], type=pa.string()),
                        "shard": pa.array(np.full(len(kept_rows), shard_id, dtype=np.int32)),
                        "row": pa.array(kept_rows),
                        "winner": pa.array(winner[kept_rows]),
                        "label_0": pa.array(label_np[kept_rows]),
                    }
                )
            )
        if d_empty:
            logger.warning("%s: dropped %d rows with an empty caption", source, d_empty)
        if d_ties:
            logger.info("%s: dropped %d tied or unlabeled rows", source, d_ties)
        if d_people:
            logger.info("%s: people_only dropped %d rows not about people", source, d_people)
        self._shards = shards
        self._rows = pa.concat_tables(parts).combine_chunks()
        self.metadata = {}
        self.people_only = people_only
        self.info = PreferenceDatasetInfo(
            source=source,
            kind="pickapic",
            pool_size=None,
            scorer=None,
            model=None,
            num_pairs=self._rows.num_rows,
            dropped_ties=d_ties,
            dropped_empty_captions=d_empty,
            dropped_not_people=d_people,
        )
        self._reset_caches()

    # -- process-local caches -------------------------------------------------

    def _reset_caches(self) -> None:
        self._pid = os.getpid()
        self._files = _LRU(16)
        self._row_groups = _LRU(self.cache_batches, self.cache_bytes)
        self._cursors = _LRU(4)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_files", "_row_groups", "_cursors", "_pid"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_caches()

    def _batch(self, shard_id: int, rg: int, number: int) -> pa.RecordBatch:
        """Batch ``number`` (of :attr:`batch_rows` rows) of row group ``rg``, streamed with ``iter_batches``.

        A row group is never read whole: one reader per row group walks forward batch by batch, so the
        (usual) in-order access reads each batch once; a step back restarts that row group's reader.
        """
        if os.getpid() != self._pid:
            self._reset_caches()
        key = (shard_id, rg, number)
        batch = self._row_groups.get(key)
        if batch is not None:
            return batch
        pf = self._files.get(shard_id)
        if pf is None:
            pf = pq.ParquetFile(self._shards[shard_id].path, memory_map=True)
            self._files.put(shard_id, pf)
        cursor = self._cursors.get((shard_id, rg))
        if cursor is None or cursor[1] > number:
            reader = pf.iter_batches(batch_size=self.batch_rows, row_groups=[rg], columns=["jpg_0", "jpg_1"])
            cursor = (reader, 0)
        reader, position = cursor
        for _ in range(number - position):
            next(reader)
        batch = next(reader)
        self._cursors.put((shard_id, rg), (reader, number + 1))
        self._row_groups.put(key, batch, batch.nbytes)
        return batch

    # -- items -------------------------------------------------------------------

    def _locate(self, i: int) -> tuple[int, int, int]:
        shard_id = self._rows.column("shard")[i].as_py()
        row = self._rows.column("row")[i].as_py()
        winner = self._rows.column("winner")[i].as_py()
        return shard_id, row, winner

    def _source(self, col: int, shard_id: int, row: int) -> str:
        return f"jpg_{col} of row {row} in {self._shards[shard_id].path.name}"

    def image_sources(self, i: int) -> tuple[str, str]:
        shard_id, row, winner = self._locate(self._index(i))
        return self._source(winner, shard_id, row), self._source(1 - winner, shard_id, row)

    def load_pair(self, i: int) -> tuple[Image.Image, Image.Image]:
        i = self._index(i)
        shard_id, row, winner = self._locate(i)
        starts = self._shards[shard_id].rg_starts
        rg = int(np.searchsorted(starts, row, side="right")) - 1
        number, offset = divmod(row - int(starts[rg]), self.batch_rows)
        try:
            batch = self._batch(shard_id, rg, number)
        except (OSError, pa.ArrowException, StopIteration) as exc:
            raise CorruptImageError(
                i, self._source(winner, shard_id, row), f"cannot read row group {rg}: {exc!r}"
            ) from exc
        out = []
        for col in (winner, 1 - winner):
            value = batch.column(f"jpg_{col}")[offset].as_py()
            if isinstance(value, dict):  # Hugging Face Image struct {bytes, path}
                value = value.get("bytes")
            out.append(_decode_image(value, i, self._source(col, shard_id, row)))
        return out[0], out[1]

    def item_metadata(self, i: int) -> dict[str, Any]:
        shard_id, row, winner = self._locate(self._index(i))
        return {
            "file": str(self._shards[shard_id].path),
            "row": row,
            "winner_column": f"jpg_{winner}",
            "label_0": self._rows.column("label_0")[self._index(i)].as_py(),
        }

    def fingerprint(self) -> str:
        h = _Hasher()
        h.add("hgdpo-fingerprint-v1", self.kind, f"people_only={self.people_only}")
        for shard in self._shards:
            try:
                st = os.stat(shard.path)
                h.add(shard.path.name, st.st_size, st.st_mtime_ns)
            except OSError:
                h.add(shard.path.name, "missing")
        for name in ("shard", "row", "winner"):
            arr = self._rows.column(name).to_numpy()
            h.add(name, np.ascontiguousarray(arr).tobytes())
        for p in self._rows.column("prompt").to_pylist():
            h.add(p)
        return h.hexdigest()[:16]


def open_preference_dataset(path: str | Path, people_only: bool = False) -> PreferenceDataset:
    """Open a triplet dataset or Pick-a-Pic v2 style parquet data.

    Args:
        path: a directory holding ``index.parquet`` (hgdpo triplets), a
            ``.parquet`` file in either layout, or a directory of Pick-a-Pic
            ``*.parquet`` shards (read in sorted name order).
        people_only: keep only pairs whose prompt :func:`is_about_people`.

    Raises:
        FileNotFoundError: ``path`` does not exist or holds no parquet file.
        ValueError: the parquet columns match neither layout, or the triplet
            ``format_version`` is newer than supported.
    """
    p = Path(path).expanduser()
    source = str(p)
    if not p.exists():
        raise FileNotFoundError(
            f"preference dataset not found: {source!r} (expected a directory with "
            f"{INDEX_FILENAME}, a .parquet file, or a directory of Pick-a-Pic .parquet shards)"
        )
    if p.is_dir():
        index = p / INDEX_FILENAME
        if index.is_file():
            files = [index]
        else:
            files = sorted(
                f for f in p.iterdir() if f.suffix == ".parquet" and not f.name.startswith(".") and f.is_file()
            )
            if not files:
                raise FileNotFoundError(
                    f"{source!r} is a directory without {INDEX_FILENAME} and without *.parquet shards; "
                    "pass an hgdpo triplet dataset directory, a .parquet file, or a directory of "
                    "Pick-a-Pic parquet shards"
                )
    else:
        files = [p]

    kinds = []
    for f in files:
        try:
            names = pq.read_schema(f).names
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"{f}: not a readable parquet file: {exc}") from exc
        kind = _layout_of(names)
        if kind is None:
            raise ValueError(f"{f}: unrecognized parquet columns {names}; {_LAYOUTS_HELP}")
        kinds.append(kind)

    if kinds[0] == "triplets":
        if len(files) > 1:
            raise ValueError(
                f"{source!r}: a directory of several triplet parquet files is not supported; "
                f"an hgdpo triplet dataset has a single {INDEX_FILENAME} (pass that file or its directory)"
            )
        return _TripletDataset(files[0], source, people_only)
    bad = [f.name for f, k in zip(files, kinds) if k != "pickapic"]
    if bad:
        raise ValueError(f"{source!r}: mixed layouts; these shards are not Pick-a-Pic style: {bad}")
    return _PickapicDataset(files, source, people_only)


# --------------------------------------------------------------------------
# writer
# --------------------------------------------------------------------------

_IMAGE_FORMATS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "png": ("PNG", ".png", {}),
    "jpeg": ("JPEG", ".jpg", {"quality": 95}),
    "jpg": ("JPEG", ".jpg", {"quality": 95}),
}

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class TripletWriter:
    """Writes an hgdpo triplet dataset (see the module docstring).

    Each :meth:`add` writes the two image files atomically (temp file in the
    same directory, fsync, ``os.replace``); :meth:`close` writes
    ``index.parquet`` the same way and fsyncs the directory.  Usable as a
    context manager; if the ``with`` body raises, the pairs added so far are
    still indexed but the metadata says ``"complete": false``.

    Args:
        out_dir: dataset directory; created if missing.  An existing non-empty
            directory is refused unless ``overwrite=True``, which deletes its
            ``index.parquet`` and ``images/`` (nothing else).
        pool_size, scorer, model: recorded in the dataset metadata.
        image_format: ``"png"`` (lossless, default) or ``"jpeg"`` (quality 95).
        overwrite: see ``out_dir``.
        extra_metadata: further JSON-serializable keys for the metadata.
        fsync: fsync every image file (durability on power loss; default True).
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        pool_size: int | None = None,
        scorer: str | None = None,
        model: str | None = None,
        image_format: str = "png",
        overwrite: bool = False,
        extra_metadata: Mapping[str, Any] | None = None,
        fsync: bool = True,
    ) -> None:
        fmt = image_format.lower()
        if fmt not in _IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {sorted(_IMAGE_FORMATS)}, got {image_format!r}")
        self.out_dir = Path(out_dir).expanduser()
        self._pil_format, self._ext, self._save_kwargs = _IMAGE_FORMATS[fmt]
        self._fsync = fsync
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise NotADirectoryError(f"{self.out_dir} exists and is not a directory")
        if self.out_dir.is_dir() and any(self.out_dir.iterdir()):
            if not overwrite:
                raise FileExistsError(
                    f"{self.out_dir} is not empty; refusing to write a dataset there "
                    "(pass overwrite=True to replace its index.parquet and images/)"
                )
            index = self.out_dir / INDEX_FILENAME
            if index.exists():
                index.unlink()
            if (self.out_dir / "images").is_dir():
                shutil.rmtree(self.out_dir / "images")
        self.images_dir = self.out_dir / "images"
        self.images_dir.mkdir(parents=True, exist_ok=True)

        self._metadata: dict[str, Any] = dict(extra_metadata or {})
        self._metadata.update(
            {
                "format_version": FORMAT_VERSION,
                "pool_size": None if pool_size is None else int(pool_size),
                "scorer": scorer,
                "model": model,
                "image_format": "jpeg" if fmt == "jpg" else fmt,
            }
        )
        json.dumps(self._metadata)  # fail early on non-serializable metadata
        self._rows: dict[str, list[Any]] = {
            k: []
            for k in ("prompt", "win_image", "lose_image", "win_score", "lose_score", "scores", "win_seed", "lose_seed")
        }
        self._closed = False

    def __len__(self) -> int:
        return len(self._rows["prompt"])

    def __enter__(self) -> "TripletWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._closed:
            return
        if exc_type is not None:
            logger.warning("TripletWriter for %s closed by %s; indexing %d pairs as incomplete",
                           self.out_dir, exc_type.__name__, len(self))
        self._write_index(complete=exc_type is None)
        self._closed = True

    @staticmethod
    def _score(name: str, value: Any) -> float:
        f = float(value)
        if not math.isfinite(f):
            raise ValueError(f"{name} must be finite, got {value!r}")
        return f

    @staticmethod
    def _seed(name: str, value: Any) -> int | None:
        if value is None:
            return None
        s = operator.index(value)
        if not _INT64_MIN <= s <= _INT64_MAX:
            raise ValueError(f"{name}={s} does not fit in int64")
        return s

    def _save_image(self, image: Image.Image, rel: str) -> None:
        if image.mode != "RGB":
            image = image.convert("RGB")
        buf = io.BytesIO()
        image.save(buf, format=self._pil_format, **self._save_kwargs)
        path = self.out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buf.getvalue(), fsync=self._fsync)

    def add(
        self,
        prompt: str,
        win_image: Image.Image,
        lose_image: Image.Image,
        win_score: float,
        lose_score: float,
        scores: list[float] | None = None,
        win_seed: int | None = None,
        lose_seed: int | None = None,
    ) -> int:
        """Write one pair's images and record its row; returns the row index."""
        if self._closed:
            raise RuntimeError("TripletWriter is closed")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        for name, im in (("win_image", win_image), ("lose_image", lose_image)):
            if not isinstance(im, Image.Image):
                raise TypeError(f"{name} must be a PIL.Image.Image, got {type(im).__name__}")
        ws = self._score("win_score", win_score)
        ls = self._score("lose_score", lose_score)
        pool = None if scores is None else [self._score("scores[]", s) for s in scores]
        wseed = self._seed("win_seed", win_seed)
        lseed = self._seed("lose_seed", lose_seed)

        idx = len(self)
        sub = f"images/{idx // 1000:04d}"
        win_rel = f"{sub}/{idx:06d}_win{self._ext}"
        lose_rel = f"{sub}/{idx:06d}_lose{self._ext}"
        self._save_image(win_image, win_rel)
        self._save_image(lose_image, lose_rel)

        r = self._rows
        r["prompt"].append(prompt)
        r["win_image"].append(win_rel)
        r["lose_image"].append(lose_rel)
        r["win_score"].append(ws)
        r["lose_score"].append(ls)
        r["scores"].append(pool)
        r["win_seed"].append(wseed)
        r["lose_seed"].append(lseed)
        return idx

    def _write_index(self, complete: bool) -> None:
        keys = list(self._rows)
        rows = [dict(zip(keys, values)) for values in zip(*self._rows.values())]
        write_triplet_index(self.out_dir, rows, pool_size=self._metadata["pool_size"],
                            scorer=self._metadata["scorer"], model=self._metadata["model"],
                            image_format=self._metadata["image_format"], complete=complete,
                            extra_metadata=self._metadata)

    def flush(self) -> None:
        """Write the index of the pairs added so far (marked incomplete); keep writing."""
        if self._closed:
            raise RuntimeError("TripletWriter is closed")
        self._write_index(complete=False)

    def close(self) -> None:
        """Write ``index.parquet`` (complete) and close; idempotent."""
        if not self._closed:
            self._write_index(complete=True)
            self._closed = True


_TRIPLET_COLUMNS = ("prompt", "win_image", "lose_image", "win_score", "lose_score", "scores", "win_seed", "lose_seed")


def write_triplet_index(
    out_dir: str | Path,
    rows: Sequence[Mapping[str, Any]],
    *,
    pool_size: int | None = None,
    scorer: str | None = None,
    model: str | None = None,
    image_format: str = "png",
    complete: bool = True,
    extra_metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``<out_dir>/index.parquet`` of the triplet format atomically; return its path.

    Each row is a mapping with ``prompt``, ``win_image``, ``lose_image`` (paths relative to
    ``out_dir``, ``/``-separated), ``win_score``, ``lose_score`` and optionally ``scores``,
    ``win_seed``, ``lose_seed`` (missing or None = null).  This is what :class:`TripletWriter`
    writes on close; use it when the image files were written some other way (e.g. the
    resumable dataset builder).  Rows are validated like :meth:`TripletWriter.add`.
    """
    out_dir = Path(out_dir).expanduser()
    r: dict[str, list[Any]] = {k: [] for k in _TRIPLET_COLUMNS}
    for n, row in enumerate(rows):
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"row {n}: prompt must be a non-empty string, got {prompt!r}")
        for key in ("win_image", "lose_image"):
            if not isinstance(row.get(key), str) or not row[key]:
                raise ValueError(f"row {n}: {key} must be a non-empty relative path, got {row.get(key)!r}")
        scores = row.get("scores")
        r["prompt"].append(prompt)
        r["win_image"].append(row["win_image"])
        r["lose_image"].append(row["lose_image"])
        r["win_score"].append(TripletWriter._score("win_score", row.get("win_score")))
        r["lose_score"].append(TripletWriter._score("lose_score", row.get("lose_score")))
        r["scores"].append(None if scores is None else [TripletWriter._score("scores[]", v) for v in scores])
        r["win_seed"].append(TripletWriter._seed("win_seed", row.get("win_seed")))
        r["lose_seed"].append(TripletWriter._seed("lose_seed", row.get("lose_seed")))
    cols: dict[str, pa.Array] = {
        "prompt": pa.array(r["prompt"], type=pa.string()),
        "win_image": pa.array(r["win_image"], type=pa.string()),
        "lose_image": pa.array(r["lose_image"], type=pa.string()),
        "win_score": pa.array(r["win_score"], type=pa.float64()),
        "lose_score": pa.array(r["lose_score"], type=pa.float64()),
    }
    # optional columns are written only when some row has a value
    if any(v is not None for v in r["scores"]):
        cols["scores"] = pa.array(r["scores"], type=pa.list_(pa.float64()))
    for key in ("win_seed", "lose_seed"):
        if any(v is not None for v in r[key]):
            cols[key] = pa.array(r[key], type=pa.int64())
    from hgdpo import __version__

    meta: dict[str, Any] = dict(extra_metadata or {})
    meta.update(
        format_version=FORMAT_VERSION,
        pool_size=None if pool_size is None else int(pool_size),
        scorer=scorer,
        model=model,
        image_format=image_format,
        num_pairs=len(r["prompt"]),
        complete=complete,
        created_by=f"hgdpo {__version__}",
    )
    table = pa.table(cols).replace_schema_metadata({METADATA_KEY: json.dumps(meta, sort_keys=True)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / INDEX_FILENAME
    atomic_write_bytes(path, sink.getvalue().to_pybytes())
    return path


# --------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------

_PICKAPIC_SCHEMA = pa.schema(
    [
        ("caption", pa.string()),
        ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),
        ("label_1", pa.float64()),
    ]
)


def export_pickapic(
    dataset_dir: str | Path,
    out_parquet: str | Path,
    *,
    jpeg_quality: int = 95,
    row_group_size: int = 100,
) -> int:
    """Convert an hgdpo triplet dataset to a Pick-a-Pic v2 style parquet file.

    Columns ``caption, jpg_0, jpg_1, label_0, label_1``; the winner is always
    ``jpg_0`` (``label_0=1.0, label_1=0.0``); images are re-encoded as JPEG.
    Rows are streamed in row groups of ``row_group_size``; the file is written
    to a temp file next to ``out_parquet``, fsynced and renamed into place.
    Returns the number of rows written.

    Raises:
        CorruptImageError: an image of the source dataset cannot be loaded.
    """
    ds = open_preference_dataset(dataset_dir)
    out = Path(out_parquet).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"exported_from": str(dataset_dir), "fingerprint": ds.fingerprint(), "source_kind": ds.kind,
            "source_metadata": ds.metadata}
    schema = _PICKAPIC_SCHEMA.with_metadata({"hgdpo_export": json.dumps(meta, sort_keys=True, default=str)})

    def jpeg(im: Image.Image) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=jpeg_quality)
        return buf.getvalue()

    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        batch: dict[str, list[Any]] = {name: [] for name in schema.names}

        def flush_batch() -> None:
            if batch["caption"]:
                writer.write_table(pa.table(batch, schema=schema))
                for v in batch.values():
                    v.clear()

        for i in range(len(ds)):
            win, lose = ds.load_pair(i)
            batch["caption"].append(ds.prompt(i))
            batch["jpg_0"].append(jpeg(win))
            batch["jpg_1"].append(jpeg(lose))
            batch["label_0"].append(1.0)
            batch["label_1"].append(0.0)
            if len(batch["caption"]) >= row_group_size:
                flush_batch()
        flush_batch()
    return len(ds)
