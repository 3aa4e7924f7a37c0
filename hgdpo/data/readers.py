"""Reading preference (win/lose pair) datasets for HG-DPO training: :func:`open_preference_dataset`.

Depends only on the standard library, numpy, pyarrow and Pillow (no torch import is needed; a
:class:`PreferenceDataset` is a plain map-style dataset that any ``torch.utils.data.DataLoader`` accepts).
It reads both layouts of :mod:`hgdpo.data.format`: an hgdpo triplet dataset, and Pick-a-Pic v2 style
parquet. Of Pick-a-Pic data only the small columns are read when opening; image bytes are streamed on
demand in batches of a few rows (``iter_batches``, memory-mapped) and kept in a small LRU cache, so neither
a large shard nor one huge row group is ever held in memory whole.

Filtering
---------

Rows are dropped (and counted in :class:`~hgdpo.data.format.PreferenceDatasetInfo`) in this order,
each row counted once under the first rule that drops it: ties (Pick-a-Pic
only), empty or whitespace-only prompt/caption, and with ``people_only=True``
prompts that :func:`hgdpo.data.people.is_about_people` rejects.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import operator
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from hgdpo.data.format import (
    FORMAT_VERSION,
    INDEX_FILENAME,
    METADATA_KEY,
    CorruptImageError,
    PreferenceDatasetInfo,
    resolve_dataset_path,
)
from hgdpo.data.people import is_about_people

__all__ = ["MAX_IMAGE_PIXELS", "PreferenceDataset", "open_preference_dataset"]

logger = logging.getLogger(__name__)

_TRIPLET_REQUIRED = ("prompt", "win_image", "lose_image")
_PICKAPIC_REQUIRED = ("caption", "jpg_0", "jpg_1", "label_0")
_LAYOUTS_HELP = (
    "expected either the hgdpo triplet layout (prompt, win_image, lose_image, "
    "win_score, lose_score[, scores, win_seed, lose_seed]) or the Pick-a-Pic v2 "
    "layout (caption, jpg_0, jpg_1, label_0[, label_1])"
)


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


