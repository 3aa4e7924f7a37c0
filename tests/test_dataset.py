"""Tests for the triplet format, readers and writers (hgdpo.data): real files in tmp_path, no mocks."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from hgdpo.data.format import FORMAT_VERSION, CorruptImageError, PreferenceDatasetInfo
from hgdpo.data.people import is_about_people
from hgdpo.data.pickapic import export_pickapic
from hgdpo.data.readers import open_preference_dataset
from hgdpo.data.writers import TripletWriter

# --------------------------------------------------------------------------- helpers


def noise(seed: int, size: tuple[int, int] = (16, 12)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def solid(color: tuple[int, int, int], size: int = 16) -> Image.Image:
    return Image.new("RGB", (size, size), color)


def jpeg_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def mean_color(im: Image.Image) -> np.ndarray:
    return np.asarray(im, dtype=np.float64).reshape(-1, 3).mean(axis=0)


def assert_color(im: Image.Image, color: tuple[int, int, int], tol: float = 6.0) -> None:
    assert im.mode == "RGB"
    assert np.abs(mean_color(im) - np.array(color)).max() <= tol, (mean_color(im), color)


RED, BLUE, GREEN, WHITE = (220, 20, 20), (20, 20, 220), (20, 200, 20), (250, 250, 250)


def write_pickapic(path: Path, rows: list[dict], row_group_size: int | None = None) -> Path:
    table = pa.table(
        {
            "caption": pa.array([r["caption"] for r in rows], type=pa.string()),
            "jpg_0": pa.array([r["jpg_0"] for r in rows], type=pa.binary()),
            "jpg_1": pa.array([r["jpg_1"] for r in rows], type=pa.binary()),
            "label_0": pa.array([r["label_0"] for r in rows], type=pa.float64()),
            "label_1": pa.array([None if r["label_0"] is None else 1.0 - r["label_0"] for r in rows], pa.float64()),
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def make_triplets(root: Path, n: int = 3, **kw) -> Path:
    with TripletWriter(root, pool_size=4, scorer="hps-v2", model="sd15-test", **kw) as w:
        for i in range(n):
            w.add(f"a photo of a woman number {i}", noise(10 * i), noise(10 * i + 1),
                  win_score=0.9 - i * 0.01, lose_score=0.1 + i * 0.01,
                  scores=[0.9 - i * 0.01, 0.5, 0.3, 0.1 + i * 0.01], win_seed=1000 + i, lose_seed=2000 + i)
    return root


# --------------------------------------------------------------------------- triplets


def test_writer_reader_roundtrip(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    with TripletWriter(root, pool_size=4, scorer="hps-v2", model="sd15-test", extra_metadata={"steps": 30}) as w:
        assert w.add("a man riding a horse", noise(1), noise(2), 0.8, 0.2, scores=[0.8, 0.5, 0.3, 0.2],
                     win_seed=11, lose_seed=2**63 - 1) == 0
        assert w.add("a portrait of a girl", noise(3, (20, 20)), noise(4, (20, 20)), np.float32(0.75), 0.25) == 1
        w.add("a tree", noise(5).convert("L"), noise(6), 1.5, -2.0, win_seed=7)
    assert (root / "index.parquet").is_file()
    assert not [p for p in root.rglob("*.tmp")]

    for path in (root, root / "index.parquet", str(root)):
        ds = open_preference_dataset(path)
        assert len(ds) == 3
        assert ds.kind == "triplets"
        assert [ds.prompt(i) for i in range(3)] == ["a man riding a horse", "a portrait of a girl", "a tree"]
        info = ds.info
        assert isinstance(info, PreferenceDatasetInfo)
        assert (info.kind, info.pool_size, info.scorer, info.model, info.num_pairs) == (
            "triplets", 4, "hps-v2", "sd15-test", 3)
        assert (info.dropped_ties, info.dropped_empty_captions, info.dropped_not_people) == (0, 0, 0)
        assert info.source == str(path)
        assert ds.metadata["format_version"] == FORMAT_VERSION
        assert ds.metadata["complete"] is True and ds.metadata["steps"] == 30

    win, lose = ds.load_pair(0)
    assert np.array_equal(np.asarray(win), np.asarray(noise(1)))
    assert np.array_equal(np.asarray(lose), np.asarray(noise(2)))
    win, _ = ds.load_pair(2)
    assert np.array_equal(np.asarray(win), np.asarray(noise(5).convert("L").convert("RGB")))

    item = ds[-2]
    assert set(item) == {"index", "prompt", "win", "lose"}
    assert item["index"] == 1 and item["prompt"] == "a portrait of a girl"
    assert item["win"].size == (20, 20) and item["win"].mode == "RGB"
    assert np.array_equal(np.asarray(item["lose"]), np.asarray(noise(4, (20, 20))))
    with pytest.raises(IndexError):
        ds[3]

    m0, m1, m2 = (ds.item_metadata(i) for i in range(3))
    assert (m0["win_score"], m0["lose_score"], m0["scores"]) == (0.8, 0.2, [0.8, 0.5, 0.3, 0.2])
    assert (m0["win_seed"], m0["lose_seed"]) == (11, 2**63 - 1)
    assert m1["win_score"] == pytest.approx(0.75) and m1["scores"] is None and m1["win_seed"] is None
    assert (m2["win_score"], m2["lose_score"], m2["win_seed"], m2["lose_seed"]) == (1.5, -2.0, 7, None)

    schema = pq.read_schema(root / "index.parquet")
    assert schema.field("win_score").type == pa.float64()
    assert schema.field("scores").type == pa.list_(pa.float64())
    assert schema.field("win_seed").type == pa.int64()
    meta = json.loads(schema.metadata[b"hgdpo"])
    assert meta["format_version"] == 1 and meta["pool_size"] == 4 and meta["num_pairs"] == 3

    # picklable for DataLoader workers
    clone = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(np.asarray(clone.load_pair(0)[0]), np.asarray(noise(1)))


def test_writer_validation_and_overwrite(tmp_path: Path) -> None:
    root = make_triplets(tmp_path / "ds", n=2)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        TripletWriter(root)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        TripletWriter(other)

    with TripletWriter(root, overwrite=True, image_format="jpeg") as w:
        with pytest.raises(ValueError, match="non-empty"):
            w.add("   ", noise(1), noise(2), 1.0, 0.0)
        with pytest.raises(ValueError, match="finite"):
            w.add("x", noise(1), noise(2), float("nan"), 0.0)
        with pytest.raises(TypeError):
            w.add("x", np.zeros((4, 4, 3)), noise(2), 1.0, 0.0)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="int64"):
            w.add("x", noise(1), noise(2), 1.0, 0.0, win_seed=2**64 - 1)
        w.add("a cat", solid(RED), solid(BLUE), 1.0, 0.0)
    ds = open_preference_dataset(root)
    assert len(ds) == 1 and ds.info.pool_size is None and ds.metadata["image_format"] == "jpeg"
    assert sorted(p.name for p in root.rglob("*") if p.is_file()) == ["000000_lose.jpg", "000000_win.jpg",
                                                                         "index.parquet"]
    with pytest.raises(RuntimeError):
        w.add("late", noise(1), noise(2), 1.0, 0.0)


def test_writer_interrupted_marks_incomplete(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "ds"
    with pytest.raises(KeyboardInterrupt):
        with TripletWriter(root) as w:
            w.add("a boy", noise(1), noise(2), 1.0, 0.0)
            raise KeyboardInterrupt
    with caplog.at_level(logging.WARNING, logger="hgdpo.data.readers"):
        ds = open_preference_dataset(root)
    assert len(ds) == 1 and ds.metadata["complete"] is False
    assert "complete=false" in caplog.text


def test_empty_prompts_dropped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # a hand-written index without hgdpo metadata is read as format v1
    root = tmp_path / "ds"
    (root / "img").mkdir(parents=True)
    for name, seed in (("a.png", 1), ("b.png", 2)):
        noise(seed).save(root / "img" / name)
    pq.write_table(pa.table({
        "prompt": ["a woman", "", "   \t\n", None, "a mango on a table"],
        "win_image": ["img/a.png"] * 5,
        "lose_image": ["img/b.png"] * 5,
        "win_score": [1.0] * 5,
        "lose_score": [0.0] * 5,
    }), root / "index.parquet")
    with caplog.at_level(logging.WARNING, logger="hgdpo.data.readers"):
        ds = open_preference_dataset(root)
    assert [ds.prompt(i) for i in range(len(ds))] == ["a woman", "a mango on a table"]
    assert ds.info.dropped_empty_captions == 3 and ds.info.num_pairs == 2
    assert ds.info.pool_size is None and ds.info.scorer is None
    assert "dropped 3 rows with an empty prompt" in caplog.text

    ppl = open_preference_dataset(root, people_only=True)
    assert [ppl.prompt(i) for i in range(len(ppl))] == ["a woman"]
    assert (ppl.info.dropped_empty_captions, ppl.info.dropped_not_people) == (3, 1)


def test_corrupt_truncated_and_missing_images(tmp_path: Path) -> None:
    root = make_triplets(tmp_path / "ds", n=4)
    ds = open_preference_dataset(root)
    win0, _ = ds.image_sources(0)
    _, lose1 = ds.image_sources(1)
    win2, _ = ds.image_sources(2)
    Path(win0).write_bytes(np.random.default_rng(0).bytes(500))
    data = Path(lose1).read_bytes()
    Path(lose1).write_bytes(data[: len(data) // 2])
    os.remove(win2)

    cases = {0: (win0, "UnidentifiedImageError"), 1: (lose1, "truncated"), 2: (win2, "not found")}
    for i, (path, why) in cases.items():
        with pytest.raises(CorruptImageError) as ei:
            ds[i]
        err = ei.value
        assert isinstance(err, ValueError)
        assert err.index == i and err.source == path
        assert Path(path).name in str(err) and why in str(err) and f"item {i}" in str(err)
        assert pickle.loads(pickle.dumps(err)).source == path

    win, lose = ds.load_pair(3)
    assert np.array_equal(np.asarray(win), np.asarray(noise(30)))
    assert ds.prompt(2) == "a photo of a woman number 2"
    ds.fingerprint()  # a missing file does not break the fingerprint


# --------------------------------------------------------------------------- Pick-a-Pic


def test_pickapic_labels_ties_and_order(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [
        {"caption": "red wins", "jpg_0": jpeg_bytes(solid(RED)), "jpg_1": jpeg_bytes(solid(BLUE)), "label_0": 1.0},
        {"caption": "blue wins", "jpg_0": jpeg_bytes(solid(RED)), "jpg_1": jpeg_bytes(solid(BLUE)), "label_0": 0.0},
        {"caption": "a tie", "jpg_0": jpeg_bytes(solid(RED)), "jpg_1": jpeg_bytes(solid(BLUE)), "label_0": 0.5},
        {"caption": " ", "jpg_0": jpeg_bytes(solid(RED)), "jpg_1": jpeg_bytes(solid(BLUE)), "label_0": 1.0},
        {"caption": "unlabeled", "jpg_0": jpeg_bytes(solid(RED)), "jpg_1": jpeg_bytes(solid(BLUE)), "label_0": None},
        {"caption": "green wins", "jpg_0": jpeg_bytes(solid(BLUE)), "jpg_1": jpeg_bytes(solid(GREEN)), "label_0": 0},
    ]
    path = write_pickapic(tmp_path / "train-0000.parquet", rows, row_group_size=2)
    with caplog.at_level(logging.WARNING, logger="hgdpo.data.readers"):
        ds = open_preference_dataset(path)
    assert "dropped 1 rows with an empty caption" in caplog.text
    assert ds.kind == "pickapic" and len(ds) == 3
    assert (ds.info.dropped_ties, ds.info.dropped_empty_captions, ds.info.dropped_not_people) == (2, 1, 0)
    assert (ds.info.pool_size, ds.info.scorer, ds.info.model) == (None, None, None)
    assert [ds.prompt(i) for i in range(3)] == ["red wins", "blue wins", "green wins"]
    expected = [(RED, BLUE), (BLUE, RED), (GREEN, BLUE)]
    for i in (2, 0, 1):  # out of order: crosses row groups and the cache
        item = ds[i]
        assert_color(item["win"], expected[i][0])
        assert_color(item["lose"], expected[i][1])
    assert ds.image_sources(1) == ("jpg_1 of row 1 in train-0000.parquet", "jpg_0 of row 1 in train-0000.parquet")
    assert ds.item_metadata(2)["row"] == 5

    clone = pickle.loads(pickle.dumps(ds))
    assert_color(clone[1]["win"], BLUE)


def test_pickapic_shard_directory_hf_struct_and_corrupt_bytes(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    # shard names sort as b < c; the struct layout is what HF `datasets` Image() writes
    write_pickapic(shards / "c.parquet", [
        {"caption": "third", "jpg_0": jpeg_bytes(solid(GREEN)), "jpg_1": jpeg_bytes(solid(RED)), "label_0": 1.0},
        {"caption": "fourth", "jpg_0": b"\x00not a jpeg", "jpg_1": jpeg_bytes(solid(RED)), "label_0": 0.0},
        {"caption": "fifth", "jpg_0": jpeg_bytes(solid(RED)), "jpg_1": b"\x00not a jpeg", "label_0": 0.0},
    ])
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({
        "caption": ["first", "second"],
        "jpg_0": pa.array([{"bytes": jpeg_bytes(solid(RED)), "path": None},
                           {"bytes": jpeg_bytes(solid(RED)), "path": None}], type=struct),
        "jpg_1": pa.array([{"bytes": jpeg_bytes(solid(BLUE)), "path": None},
                           {"bytes": jpeg_bytes(solid(BLUE)), "path": None}], type=struct),
        "label_0": [1.0, 0.0],
        "extra": [1, 2],
    }), shards / "b.parquet")
    (shards / "readme.txt").write_text("not a shard")

    ds = open_preference_dataset(shards)
    assert [ds.prompt(i) for i in range(len(ds))] == ["first", "second", "third", "fourth", "fifth"]
    assert_color(ds[0]["win"], RED)
    assert_color(ds[1]["win"], BLUE)
    assert_color(ds[2]["lose"], RED)
    # row 1 of c: label_0 == 0 -> jpg_1 wins; the loser jpg_0 is garbage
    with pytest.raises(CorruptImageError) as ei:
        ds.load_pair(3)
    assert ei.value.source == "jpg_0 of row 1 in c.parquet" and ei.value.index == 3
    # row 2 of c: label_0 == 0 -> the winner jpg_1 is garbage
    with pytest.raises(CorruptImageError) as ei:
        ds.load_pair(4)
    assert ei.value.source == "jpg_1 of row 2 in c.parquet" and ei.value.index == 4
    assert "jpg_1 of row 2 in c.parquet" in str(ei.value)
    assert_color(ds[2]["win"], GREEN)  # items after a broken one still load


def test_pickapic_loser_corrupt(tmp_path: Path) -> None:
    path = write_pickapic(tmp_path / "p.parquet", [
        {"caption": "ok", "jpg_0": jpeg_bytes(solid(RED)), "jpg_1": jpeg_bytes(solid(BLUE)), "label_0": 1.0},
        {"caption": "bad", "jpg_0": b"\xff\xd8\xff garbage", "jpg_1": jpeg_bytes(solid(BLUE)), "label_0": 0.0},
    ])
    ds = open_preference_dataset(path)
    with pytest.raises(CorruptImageError, match=r"item 1: cannot load image jpg_0 of row 1 in p\.parquet"):
        ds[1]
    assert_color(ds[0]["win"], RED)


def test_export_pickapic_roundtrip(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    colors = [(RED, BLUE), (GREEN, WHITE), (BLUE, GREEN)]
    with TripletWriter(root, scorer="pickscore") as w:
        for k, (a, b) in enumerate(colors):
            w.add(f"prompt {k} with a person", solid(a), solid(b), 1.0, 0.0)
    out = tmp_path / "export" / "pairs.parquet"
    assert export_pickapic(root, out, row_group_size=2) == 3
    assert not [p for p in out.parent.iterdir() if p.name != "pairs.parquet"]

    table = pq.read_table(out)
    assert table.column_names == ["caption", "jpg_0", "jpg_1", "label_0", "label_1"]
    assert table.column("label_0").to_pylist() == [1.0] * 3
    assert table.column("label_1").to_pylist() == [0.0] * 3
    assert Image.open(io.BytesIO(table.column("jpg_0")[0].as_py())).format == "JPEG"

    src = open_preference_dataset(root)
    back = open_preference_dataset(out)
    assert back.kind == "pickapic" and len(back) == len(src) == 3
    for i, (a, b) in enumerate(colors):
        assert back.prompt(i) == src.prompt(i)
        item = back[i]
        assert_color(item["win"], a)
        assert_color(item["lose"], b)


# --------------------------------------------------------------------------- people filter


@pytest.mark.parametrize(
    "caption",
    [
        "a man riding a horse", "Portrait of a WOMAN, 8k", "two kids playing", "1girl, solo, long_hair",
        "a selfie at the beach", "the king and his army", "an astronaut on mars", "a happy couple",
        "she is dancing", "children's party", "a doctor's office with a nurse", "men at work",
        "close-up of a human face", "a woman and a queen bee",
    ],
)
def test_is_about_people_positive(caption: str) -> None:
    assert is_about_people(caption)


@pytest.mark.parametrize(
    "caption",
    [
        "a mango", "a mountain landscape", "inhuman monster", "a humanoid robot", "the", "shell on the shore",
        "mansion in manhattan", "a snowman", "a man-made lake", "a couple of apples", "queen size bed",
        "king penguin on ice", "", "there is a cat", "a herd of sheep", "chess board", "a spaceship",
    ],
)
def test_is_about_people_negative(caption: str) -> None:
    assert not is_about_people(caption)


def test_people_only_on_pickapic(tmp_path: Path) -> None:
    img0, img1 = jpeg_bytes(solid(RED)), jpeg_bytes(solid(BLUE))
    caps = ["a woman walking", "a mango", "a tie with a man", "a mountain landscape", "", "portrait of a boy"]
    labels = [1.0, 1.0, 0.5, 0.0, 1.0, 0.0]
    path = write_pickapic(tmp_path / "p.parquet", [
        {"caption": c, "jpg_0": img0, "jpg_1": img1, "label_0": lab} for c, lab in zip(caps, labels)
    ])
    ds = open_preference_dataset(path, people_only=True)
    assert [ds.prompt(i) for i in range(len(ds))] == ["a woman walking", "portrait of a boy"]
    info = ds.info
    assert (info.num_pairs, info.dropped_ties, info.dropped_empty_captions, info.dropped_not_people) == (2, 1, 1, 2)


# --------------------------------------------------------------------------- errors


def test_wrong_columns_and_missing_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"text": ["x"], "image": [b"x"]}), bad)
    with pytest.raises(ValueError) as ei:
        open_preference_dataset(bad)
    msg = str(ei.value)
    assert "'text'" in msg and "'image'" in msg and "win_image" in msg and "jpg_0" in msg

    with pytest.raises(FileNotFoundError, match="not found"):
        open_preference_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="index.parquet"):
        open_preference_dataset(tmp_path / "empty")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="not a readable parquet"):
        open_preference_dataset(tmp_path / "junk.parquet")

    root = make_triplets(tmp_path / "future", n=1)
    t = pq.read_table(root / "index.parquet")
    t = t.replace_schema_metadata({"hgdpo": json.dumps({"format_version": FORMAT_VERSION + 1})})
    pq.write_table(t, root / "index.parquet")
    with pytest.raises(ValueError, match="format_version"):
        open_preference_dataset(root)


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_triplets(tmp_path: Path) -> None:
    root = make_triplets(tmp_path / "ds", n=3)
    fp = open_preference_dataset(root).fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert open_preference_dataset(root).fingerprint() == fp
    assert open_preference_dataset(root / "index.parquet").fingerprint() == fp
    # every prompt is about people: same rows, but the flag is part of the identity
    ppl = open_preference_dataset(root, people_only=True)
    assert len(ppl) == 3 and ppl.fingerprint() != fp

    # an image file replaced by a different image
    ds = open_preference_dataset(root)
    path = Path(ds.image_sources(1)[1])
    old_size = path.stat().st_size
    noise(99, (24, 24)).save(path)
    assert path.stat().st_size != old_size
    fp2 = open_preference_dataset(root).fingerprint()
    assert fp2 != fp

    # a row added (dataset rebuilt with one more pair)
    make_triplets(tmp_path / "ds4", n=4)
    make_triplets(tmp_path / "ds3", n=3)
    fp3 = open_preference_dataset(tmp_path / "ds3").fingerprint()
    assert open_preference_dataset(tmp_path / "ds4").fingerprint() != fp3


def test_fingerprint_pickapic(tmp_path: Path) -> None:
    img0, img1 = jpeg_bytes(solid(RED)), jpeg_bytes(solid(BLUE))
    rows = [{"caption": c, "jpg_0": img0, "jpg_1": img1, "label_0": 1.0} for c in ("a man", "a tree", "a girl")]
    path = write_pickapic(tmp_path / "p.parquet", rows)
    fp = open_preference_dataset(path).fingerprint()
    assert open_preference_dataset(path).fingerprint() == fp
    assert open_preference_dataset(path, people_only=True).fingerprint() != fp
    write_pickapic(path, rows + [{"caption": "a dog", "jpg_0": img0, "jpg_1": img1, "label_0": 0.0}])
    assert open_preference_dataset(path).fingerprint() != fp
