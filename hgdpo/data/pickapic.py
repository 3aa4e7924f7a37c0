"""Export of an hgdpo triplet dataset as Pick-a-Pic v2 style parquet (the layout of :mod:`hgdpo.data.format`)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from hgdpo.data.readers import open_preference_dataset
from hgdpo.fileio import atomic_path

__all__ = ["export_pickapic"]

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
