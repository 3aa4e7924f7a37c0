"""Writing hgdpo triplet datasets (the layout of :mod:`hgdpo.data.format`): :class:`TripletWriter` writes
images and index, :func:`write_triplet_index` only the index of images written some other way."""

from __future__ import annotations

import io
import json
import logging
import math
import operator
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from hgdpo.data.format import FORMAT_VERSION, INDEX_FILENAME, METADATA_KEY, TRIPLET_COLUMNS
from hgdpo.fileio import atomic_write_bytes

__all__ = ["TripletWriter", "write_triplet_index"]

logger = logging.getLogger(__name__)

_IMAGE_FORMATS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "png": ("PNG", ".png", {}),
    "jpeg": ("JPEG", ".jpg", {"quality": 95}),
    "jpg": ("JPEG", ".jpg", {"quality": 95}),
}

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _finite(name: str, value: Any) -> float:
    f = float(value)
    if not math.isfinite(f):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return f


def _int64(name: str, value: Any) -> int | None:
    if value is None:
        return None
    s = operator.index(value)
    if not _INT64_MIN <= s <= _INT64_MAX:
        raise ValueError(f"{name}={s} does not fit in int64")
    return s


class TripletWriter:
    """Writes an hgdpo triplet dataset (see :mod:`hgdpo.data.format`).

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
        self._rows: dict[str, list[Any]] = {k: [] for k in TRIPLET_COLUMNS}
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
        ws = _finite("win_score", win_score)
        ls = _finite("lose_score", lose_score)
        pool = None if scores is None else [_finite("scores[]", s) for s in scores]
        wseed = _int64("win_seed", win_seed)
        lseed = _int64("lose_seed", lose_seed)

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
    r: dict[str, list[Any]] = {k: [] for k in TRIPLET_COLUMNS}
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
        r["win_score"].append(_finite("win_score", row.get("win_score")))
        r["lose_score"].append(_finite("lose_score", row.get("lose_score")))
        r["scores"].append(None if scores is None else [_finite("scores[]", v) for v in scores])
        r["win_seed"].append(_int64("win_seed", row.get("win_seed")))
        r["lose_seed"].append(_int64("lose_seed", row.get("lose_seed")))
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

