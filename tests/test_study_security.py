"""The user study under hostile and mistaken use: each bad input is refused with one line naming it and the fix,
and leaves the study database as it was; each attack on the server (forged rater, foreign file, peeking at the
results) is refused on a real server on 127.0.0.1."""

import base64
import io
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from hgdpo.study.store import Study, pairs_from_folders
from tests.conftest import write_triplets
from tests.test_study import (
    ORGANISER_PASSWORD,
    RATER_PASSWORD,
    SERVER_ENV,
    USER_STUDY,
    RaterSession,
    http_get,
    http_request,
    needs_gradio,
    running_server,
    write_model_folders,
)
from trainer import user_study

SECRET = "made-by-model-A"  # written into every kind of image metadata; a rater must never receive it


def dump(path: Path) -> str:
    """The whole content of a SQLite database as SQL text (what 'unchanged' means for a study)."""
    with sqlite3.connect(path) as connection:
        return "\n".join(connection.iterdump())


def refused(capsys, argv: list[str], *needles: str) -> str:
    """Run the CLI, expect exit code 1 and a one-line error containing every needle; return the line."""
    assert user_study.main(argv) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error, error
    for needle in needles:
        assert needle in error, (needle, error)
    return error


@pytest.fixture
def study(tmp_path) -> Study:
    created = Study.create(tmp_path / "study.db", seed="hostile")
    created.add_pairs(pairs_from_folders(*write_model_folders(tmp_path, count=3)))
    return created


# --------------------------------------------------------------------------- export never overwrites the study


def test_export_refuses_the_study_itself_and_any_database(study, tmp_path, capsys):
    database, before = str(study.path), dump(study.path)
    other = Study.create(tmp_path / "other.db")
    hard_link = tmp_path / "link.csv"
    os.link(study.path, hard_link)
    (tmp_path / "folder.csv").mkdir()
    cases = [([database, database], "must end in .csv"),
             ([database, database, "--force"], "must end in .csv"),
             ([database, str(hard_link), "--force"], "is the study database itself"),
             ([database, str(other.path), "--force"], "must end in .csv"),
             ([database, str(tmp_path / "votes.txt")], "must end in .csv"),
             ([database, str(tmp_path / "folder.csv"), "--force"], "is not a file")]
    for argv, message in cases:
        refused(capsys, ["export", *argv], argv[1], message)
        assert dump(study.path) == before and study.path.read_bytes()[:16] == b"SQLite format 3\x00"
    sqlite_named_csv = tmp_path / "old-study.csv"
    sqlite_named_csv.write_bytes(other.path.read_bytes())
    refused(capsys, ["export", database, str(sqlite_named_csv), "--force"], "is a SQLite database")
    assert sqlite_named_csv.read_bytes() == other.path.read_bytes()


def test_export_replaces_an_existing_csv_only_with_force(study, tmp_path, capsys):
    target = tmp_path / "votes.csv"
    target.write_text("keep me\n")
    refused(capsys, ["export", str(study.path), str(target)], str(target), "--force")
    assert target.read_text() == "keep me\n"
    assert user_study.main(["export", str(study.path), str(target), "--force"]) == 0
    assert target.read_text().startswith("vote_id,")


def test_exported_text_cells_cannot_run_as_spreadsheet_formulas(tmp_path):
    folders = write_model_folders(tmp_path, count=1)
    prompts = tmp_path / "prompts.csv"
    prompts.write_text('name,prompt\n0000.png,"=HYPERLINK(""http://x"",""y"")"\n')
    study = Study.create(tmp_path / "study.db")
    study.add_pairs(pairs_from_folders(*folders, "+model", "@other", prompts_csv=prompts))
    study.enrol("ann")
    study.vote("ann", 1, "left")
    row = study.votes_csv().splitlines()[1]
    assert "'=HYPERLINK" in row and ",'+model," in row and ",'@other," in row


# --------------------------------------------------------------------------- building a study from bad input


BAD_PROMPT_ROWS = [
    ("0000.png,first\n0001.png\n0002.png,third\n", "line 3", "no prompt for '0001.png'"),
    ("0000.png,first\n0001.png,   \n0002.png,third\n", "line 3", "no prompt for '0001.png'"),
    ("0000.png,first,abc\n0001.png,second\n0002.png,third\n", "line 2", "seed 'abc' is not a whole number"),
    ("0000.png,first,99999999999999999999\n0001.png,b\n0002.png,c\n", "line 2", "out of range"),
    ("0000.png,first\n0000.png,again\n0001.png,b\n0002.png,c\n", "line 3", "listed again (first on line 2)"),
    ("0000.png,a photo, with a comma,1,2\n0001.png,b\n0002.png,c\n", "line 2", "more cells than the 3 columns"),
    (",first\n0001.png,b\n0002.png,c\n", "line 2", "no image name"),
    ("0000.png,a\n0001.png,b\n", "", "has no row for '0002.png'"),
]


@pytest.mark.parametrize(("rows", "line", "message"), BAD_PROMPT_ROWS)
def test_a_bad_prompts_csv_row_names_the_file_the_line_and_the_fix(study, tmp_path, capsys, rows, line, message):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("name,prompt,seed\n" + rows)
    before = dump(study.path)
    folders = [str(tmp_path / "candidate"), str(tmp_path / "baseline")]
    for database in (study.path, tmp_path / "new.db"):
        refused(capsys, ["create", str(database), "--folders", *folders, "--names", "x", "y", "--prompts",
                         str(prompts)], str(prompts), line, message)
    assert dump(study.path) == before and not (tmp_path / "new.db").exists()


@pytest.mark.parametrize(("content", "message"), [
    ("name,prompt\n0000.png,caf\xe9\n".encode("latin-1"), "is not UTF-8 text"),
    (b"name,prompt\n0000.png,a\x00b\n", "holds NUL bytes"), (None, "No prompts file")])
def test_a_prompts_file_that_is_not_utf8_csv_is_refused(tmp_path, capsys, content, message):
    folders = [str(folder) for folder in write_model_folders(tmp_path, count=1)]
    prompts = tmp_path / "prompts.csv"
    if content is not None:
        prompts.write_bytes(content)
    refused(capsys, ["create", str(tmp_path / "s.db"), "--folders", *folders, "--prompts", str(prompts)],
            str(prompts), message)
    assert not (tmp_path / "s.db").exists()


def test_a_file_that_is_not_an_image_is_refused_when_the_study_is_created(study, tmp_path, capsys):
    before = dump(study.path)
    (tmp_path / "candidate" / "0001.png").write_text("<svg xmlns='http://www.w3.org/2000/svg' onload='alert(1)'/>")
    refused(capsys, ["create", str(study.path), "--folders", str(tmp_path / "candidate"), str(tmp_path / "baseline"),
                     "--names", "p", "q"], "0001.png is not a readable PNG, JPEG or WebP image", "replace or remove it")
    assert dump(study.path) == before


def test_a_prompts_csv_without_the_columns_is_refused(tmp_path, capsys):
    folders = [str(folder) for folder in write_model_folders(tmp_path, count=1)]
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("file;text\n0000.png;a\n")
    refused(capsys, ["create", str(tmp_path / "s.db"), "--folders", *folders, "--prompts", str(prompts)],
            str(prompts), "expected CSV columns name, prompt[, seed]")
    assert not (tmp_path / "s.db").exists()


def test_a_png_seed_that_is_not_a_number_names_the_image(tmp_path, capsys):
    from hgdpo.inference.infotext import save_png

    folders = write_model_folders(tmp_path, count=1)
    for folder in folders:
        save_png(Image.new("RGB", (8, 8)), folder / "0000.png", "a prompt\nSteps: 5, Seed: 12x, Size: 8x8")
    refused(capsys, ["create", str(tmp_path / "s.db"), "--folders", *map(str, folders)],
            "0000.png (parameters text)", "seed '12x' is not a whole number", "prompts CSV")
    assert not (tmp_path / "s.db").exists()


def rewrite_index(dataset: Path, column: str, value: object) -> None:
    """Set ``column`` of the dataset's first row to ``value``, keeping the file's metadata."""
    table = pq.read_table(dataset / "index.parquet")
    values = table.column(column).to_pylist()
    values[0] = value
    index = table.schema.get_field_index(column)
    pq.write_table(table.set_column(index, table.schema.field(index), [values]), dataset / "index.parquet")


@pytest.mark.parametrize(("value", "message"), [
    (None, "win_image is empty"), ("", "win_image is empty"), ("../outside.png", "leads outside"),
    ("/etc/passwd", "leads outside"), ("images/../../outside.png", "leads outside"),
    ("escape.png", "leads outside"), ("notes.html", "is not an image file")])
def test_a_dataset_row_with_a_null_or_foreign_image_is_refused(study, tmp_path, capsys, value, message):
    dataset = write_triplets(tmp_path / "data" / "triplets", num_pairs=2)
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "outside.png")
    (dataset / "escape.png").symlink_to(tmp_path / "data" / "outside.png")
    (dataset / "notes.html").write_text("<script>alert(1)</script>")
    rewrite_index(dataset, "win_image", value)
    before = dump(study.path)
    refused(capsys, ["create", str(study.path), "--dataset", str(dataset)], "index.parquet pair 0", message)
    assert dump(study.path) == before


def test_an_image_in_a_folder_leading_outside_it_is_refused(study, tmp_path, capsys):
    candidate, baseline = tmp_path / "candidate", tmp_path / "baseline"
    (tmp_path / "private").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "private" / "secret.png")
    (candidate / "0000.png").unlink()
    (candidate / "0000.png").symlink_to(tmp_path / "private" / "secret.png")
    before = dump(study.path)
    refused(capsys, ["create", str(study.path), "--folders", str(candidate), str(baseline)],
            "0000.png leads outside", "keep the study's images inside it")
    (candidate / "0000.png").unlink()
    (candidate / "page.html").write_text("<script>alert(1)</script>")
    (candidate / "0000.png").symlink_to(candidate / "page.html")  # inside, but not an image
    refused(capsys, ["create", str(study.path), "--folders", str(candidate), str(baseline)],
            "0000.png is not an image file")
    assert dump(study.path) == before


def test_create_refuses_another_seed_for_an_existing_study(study, tmp_path, capsys):
    before = dump(study.path)
    folders = [str(tmp_path / "candidate"), str(tmp_path / "baseline")]
    refused(capsys, ["create", str(study.path), "--folders", *folders, "--names", "p", "q", "--seed", "other"],
            str(study.path), "leave the seed out")
    assert dump(study.path) == before


def test_create_refuses_empty_or_equal_model_names(study, tmp_path, capsys):
    before = dump(study.path)
    folders = [str(tmp_path / "candidate"), str(tmp_path / "baseline")]
    refused(capsys, ["create", str(study.path), "--folders", *folders, "--names", "", "q"], "model name is empty")
    refused(capsys, ["create", str(study.path), "--folders", *folders, "--names", "q", "q"], "both sides are model")
    assert dump(study.path) == before


# --------------------------------------------------------------------------- raters and their keys


def test_raters_add_prints_a_link_per_rater_and_refuses_repeats(study, capsys):
    database = str(study.path)
    assert user_study.main(["raters", "add", database, "anna", "ben", "--url", "https://study.example/"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["anna", "ben"]
    anna_key = lines[0].split("?key=")[1].split("\t")[0]
    assert lines[0].startswith("anna\thttps://study.example/study/enter?key=") and study.key_owner(anna_key) == "anna"
    before = dump(study.path)
    assert anna_key not in before  # only the key's hash is stored
    refused(capsys, ["raters", "add", database, "carl", "anna"], "'anna' holds a key already", "--replace-key")
    refused(capsys, ["raters", "add", database, "dora", "dora"], "'dora' is given twice")
    refused(capsys, ["raters", "add", database, "eve", "=cmd()"], "Invalid rater id '=cmd()'")
    refused(capsys, ["raters", "add", database, "fay", "--url", "javascript:alert(1)"], "is not an http(s) address")
    assert dump(study.path) == before  # all or nothing: carl, dora, eve and fay were not added
    assert user_study.main(["raters", "add", database, "anna", "--replace-key"]) == 0
    assert study.key_owner(anna_key) is None and "anna" in capsys.readouterr().out
    assert user_study.main(["raters", "list", database]) == 0
    assert "anna\t" in capsys.readouterr().out


def test_a_version_1_study_is_upgraded_and_keeps_its_votes(study):
    study.enrol("ann")
    study.vote("ann", 1, "tie")
    with sqlite3.connect(study.path) as connection:
        connection.execute("DROP TABLE rater_keys")
        connection.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    upgraded = Study(study.path)
    assert upgraded.vote_count() == 1 and upgraded.key_owner(upgraded.issue_key("ben")) == "ben"


# --------------------------------------------------------------------------- serve's options


@pytest.mark.parametrize(("options", "message"), [
    (["--host", "0.0.0.0"], "--host 0.0.0.0 with no password"),
    (["--host", "study.example.org"], "--insecure-no-password"),
    (["--port", "0"], "--port 0 is out of range"),
    (["--port", "70000"], "--port 70000 is out of range"),
    (["--max-raters", "0"], "--max-raters 0 must be at least 1"),
    (["--password", ""], "--password is empty"),
    (["--password", "same", "--organiser-password", "same"], "The organiser password is the raters' password")])
def test_serve_refuses_unsafe_or_impossible_options(study, capsys, monkeypatch, options, message):
    monkeypatch.delenv("HGDPO_STUDY_PASSWORD", raising=False)
    monkeypatch.delenv("HGDPO_STUDY_ORGANISER_PASSWORD", raising=False)
    before = dump(study.path)
    refused(capsys, ["serve", str(study.path), *options], message)
    assert dump(study.path) == before


def test_a_public_host_is_served_with_a_password_keys_or_the_explicit_opt_out(study, capsys, monkeypatch):
    monkeypatch.delenv("HGDPO_STUDY_PASSWORD", raising=False)
    monkeypatch.setitem(sys.modules, "gradio", None)  # stops serve just after its checks
    public = ["serve", str(study.path), "--host", "0.0.0.0"]
    refused(capsys, public + ["--insecure-no-password"], 'pip install ".[app]"')
    monkeypatch.setenv("HGDPO_STUDY_PASSWORD", "from-the-environment")
    refused(capsys, public, 'pip install ".[app]"')
    monkeypatch.delenv("HGDPO_STUDY_PASSWORD")
    study.issue_key("anna")
    refused(capsys, public, 'pip install ".[app]"')


def test_serve_help_does_not_print_the_password(tmp_path):
    env = {**os.environ, "HGDPO_STUDY_PASSWORD": "hunter2-rater", "HGDPO_STUDY_ORGANISER_PASSWORD": "hunter2-org"}
    shown = subprocess.run(USER_STUDY + ["serve", "--help"], env=env, capture_output=True, text=True, check=True)
    assert "HGDPO_STUDY_PASSWORD" in shown.stdout and "hunter2" not in shown.stdout + shown.stderr


# --------------------------------------------------------------------------- the real server under attack


def jpeg_with_exif(path: Path) -> Path:
    """A 24x16 JPEG whose EXIF names the model and says 'rotate 90' (the served image must be 16x24)."""
    exif = Image.Exif()
    exif[0x0131], exif[0x010E], exif[0x0112] = SECRET, SECRET, 6  # Software, ImageDescription, Orientation
    pixels = np.random.default_rng(0).integers(0, 255, (16, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG", quality=90, exif=exif, comment=SECRET.encode(),
                                 icc_profile=SECRET.encode() * 4)
    return path


def webp_with_xmp(path: Path) -> Path:
    """A lossless 24x16 WebP with XMP and EXIF naming the model."""
    xmp = f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description creator="{SECRET}"/></x:xmpmeta>'.encode()
    exif = Image.Exif()
    exif[0x0131] = SECRET
    pixels = np.random.default_rng(1).integers(0, 255, (16, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "WEBP", lossless=True, xmp=xmp, exif=exif)
    return path


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory):
    """A served study (rater and organiser passwords) with PNG, JPEG and WebP pairs,
    and a rater 'anna' holding a key; yields (base URL, study, anna's key, the image files)."""
    root = tmp_path_factory.mktemp("hostile")
    study = Study.create(root / "study.db", seed="hostile")
    study.add_pairs(pairs_from_folders(*write_model_folders(root, count=2)))
    jpeg, webp = root / "model-a" / "0000.jpg", root / "model-b" / "0000.jpg"
    jpeg.parent.mkdir()
    webp.parent.mkdir()
    jpeg_with_exif(jpeg)
    webp_with_xmp(webp.with_suffix(".webp")).rename(webp)  # same name as the JPEG: a WebP named .jpg
    prompts = root / "prompts.csv"
    prompts.write_text("name,prompt\n0000.jpg,a face\n")
    study.add_pairs(pairs_from_folders(jpeg.parent, webp.parent, prompts_csv=prompts))
    anna_key = study.issue_key("anna")
    with running_server(study.path, env=SERVER_ENV) as base:
        yield base, study, anna_key, {"jpeg": jpeg, "webp": webp}


def token_of(study: Study, path: Path) -> str:
    with sqlite3.connect(study.path) as connection:
        return connection.execute("SELECT token FROM images WHERE path = ?", (str(path.resolve()),)).fetchone()[0]


def votes_of(study: Study, rater: str) -> int:
    with sqlite3.connect(study.path) as connection:
        return connection.execute("SELECT COUNT(*) FROM votes WHERE rater = ?", (rater,)).fetchone()[0]


@needs_gradio
def test_a_rater_cannot_vote_as_someone_else(hostile_server):
    base, study, _, _ = hostile_server
    mallory = RaterSession(base)
    assert mallory.login("mallory", RATER_PASSWORD)[0] == 200
    pair_id = mallory.outputs("current", [], "?rater=anna")[2]
    event, _ = mallory.call("vote_left", ["anna", pair_id])  # the old API: a rater id as the first argument
    assert event == "error" and votes_of(study, "anna") == 0
    assert mallory.outputs("vote_left", [pair_id], "?rater=anna")[0].startswith("mallory · 1 /")
    other_pair = next(pair for pair in range(1, 4) if pair != mallory.outputs("current", [])[2])
    mallory.outputs("vote_right", [other_pair])  # a pair not shown to mallory: ignored
    mallory.outputs("vote_right", [None])
    assert votes_of(study, "mallory") == 1 and votes_of(study, "anna") == 0
    stranger = RaterSession(base)
    for session in (stranger, RaterSession(base)):
        status, _ = session.open("/gradio_api/call/vote_left", b'{"data": [1]}', {"Content-Type": "application/json"})
        assert status == 401
    forged = {"Cookie": "hgdpo-study-session=made-up"}
    assert http_get(base, "/config", forged)[0] == 401
    assert votes_of(study, "anna") == 0


@needs_gradio
def test_a_rater_with_a_key_logs_in_only_with_it(hostile_server):
    base, _, anna_key, _ = hostile_server
    impostor = RaterSession(base)
    status, page = impostor.login("anna", RATER_PASSWORD)  # the shared password does not open a keyed rater
    assert status == 401 and "Wrong name or password" in page
    wrong_key = anna_key[:-1] + ("y" if anna_key.endswith("x") else "x")  # one character off, never the key itself
    assert impostor.open(f"/study/enter?key={wrong_key}")[0] == 403
    assert impostor.open("/study/enter?key=")[0] == 403
    assert RaterSession(base).login("anna", anna_key)[0] == 200
    linked = RaterSession(base)
    assert linked.open(f"/study/enter?key={anna_key}")[0] == 200
    assert linked.outputs("current", [])[0].startswith("anna · ")


@needs_gradio
def test_new_rater_ids_stop_at_the_cap_and_bad_names_are_refused(study):
    study.issue_key("anna")  # a rater the organiser added counts towards the cap
    with running_server(study.path, "--max-raters", "3", env=SERVER_ENV) as base:
        for name in ("../../etc", "+SUM(A1)", "x" * 65, "<script>"):
            status, page = RaterSession(base).login(name, RATER_PASSWORD)
            assert status == 400 and "Invalid rater id" in page and "<script>" not in page
        for name in ("ben", "carl"):
            assert RaterSession(base).login(name, RATER_PASSWORD)[0] == 200
        before = dump(study.path)
        status, page = RaterSession(base).login("one-too-many", RATER_PASSWORD)
        assert status == 403 and "The study is full (3 raters)" in page
        assert dump(study.path) == before
        assert RaterSession(base).login("ben", RATER_PASSWORD)[0] == 200  # a rater who joined comes back
    assert [rater.rater for rater in study.raters()] == ["anna", "ben", "carl"]


@needs_gradio
def test_results_and_votes_are_for_the_organiser_only(hostile_server):
    base, _, anna_key, _ = hostile_server
    rater = RaterSession(base)
    assert rater.login("anna", anna_key)[0] == 200
    for path in ("/study/results", "/study/votes.csv"):
        for headers in ({}, rater.cookie_header(), basic(RATER_PASSWORD), basic(""), {"Authorization": "Basic !!"}):
            status, _, body = http_request(base, path, headers)
            assert status == 401 and b"candidate" not in body and b"vote_id" not in body, (path, headers)
        assert http_get(base, path, basic(ORGANISER_PASSWORD))[0] == 200
    status, config = http_get(base, "/config", rater.cookie_header())
    assert status == 200 and b"Results" not in config and b"votes.csv" not in config


def basic(password: str) -> dict[str, str]:
    """An HTTP basic-auth header with this password."""
    return {"Authorization": "Basic " + base64.b64encode(f"organiser:{password}".encode()).decode()}


@needs_gradio
def test_jpeg_and_webp_are_served_as_pixels_without_their_metadata(hostile_server):
    base, study, anna_key, files = hostile_server
    rater = RaterSession(base)
    assert rater.login("anna", anna_key)[0] == 200
    for kind, path in files.items():
        status, headers, body = http_request(base, f"/study/image/{token_of(study, path)}", rater.cookie_header())
        assert status == 200 and headers["content-type"] == "image/png", kind
        assert SECRET.encode() not in body and b"Exif" not in body and b"xmpmeta" not in body, kind
        served, original = Image.open(io.BytesIO(body)), Image.open(path)
        assert served.format == "PNG" and not served.info and not served.getexif(), kind
        expected = np.asarray(original.convert("RGB"))
        if kind == "jpeg":  # the EXIF orientation (rotate 90) is applied before it is dropped
            expected = np.asarray(original.transpose(Image.Transpose.ROTATE_270).convert("RGB"))
        assert np.array_equal(np.asarray(served.convert("RGB")), expected), kind


@needs_gradio
def test_an_image_swapped_for_a_symlink_or_a_non_image_is_not_served(hostile_server, tmp_path):
    base, study, anna_key, _ = hostile_server
    rater = RaterSession(base)
    assert rater.login("anna", anna_key)[0] == 200
    shown = study.show("anna", 1)
    left, right = study.image_path(shown.left_image), study.image_path(shown.right_image)
    outside = tmp_path / "outside.png"
    Image.new("RGB", (3, 3)).save(outside)
    left_bytes, right_bytes = left.read_bytes(), right.read_bytes()
    try:
        left.unlink()
        left.symlink_to(outside)
        right.write_text("<html><script>alert(document.cookie)</script></html>")
        for token in (shown.left_image, shown.right_image):
            status, headers, body = http_request(base, f"/study/image/{token}", rater.cookie_header())
            assert status == 404 and b"<script>" not in body and headers["x-content-type-options"] == "nosniff"
    finally:
        left.unlink()
        left.write_bytes(left_bytes)
        right.write_bytes(right_bytes)


@needs_gradio
def test_every_response_says_nosniff_and_refuses_framing(hostile_server):
    base, study, anna_key, files = hostile_server
    rater = RaterSession(base)
    assert rater.login("anna", anna_key)[0] == 200
    image = f"/study/image/{token_of(study, files['jpeg'])}"
    for path, headers in [("/", {}), ("/", rater.cookie_header()), ("/study/login", {}), ("/study/enter?key=x", {}),
                          (image, {}), (image, rater.cookie_header()), ("/study/image/nope", rater.cookie_header()),
                          ("/config", rater.cookie_header()), ("/gradio_api/info", {}), ("/study/results", {}),
                          ("/study/votes.csv", basic(ORGANISER_PASSWORD)), ("/no/such/page", {})]:
        status, response_headers, _ = http_request(base, path, headers)
        assert response_headers.get("x-content-type-options") == "nosniff", (path, status)
        assert response_headers.get("x-frame-options") == "DENY", (path, status)


@needs_gradio
def test_a_study_with_keys_and_no_password_admits_only_its_raters(tmp_path):
    from fastapi.testclient import TestClient

    from hgdpo.study.app import Access, build_app

    study = Study.create(tmp_path / "study.db")
    study.add_pairs(pairs_from_folders(*write_model_folders(tmp_path, count=1)))
    key = study.issue_key("anna")
    before = dump(study.path)
    with TestClient(build_app(study, Access())) as client:
        page = client.post("/study/login", data={"name": "zed", "password": "anything"})
        assert page.status_code == 403 and "use your own link" in page.text
        assert dump(study.path) == before
        assert client.get(f"/study/enter?key={key}").status_code == 200
        assert client.get("/study/image/" + study.next_pair("anna").left_image).status_code == 200
        upload = client.post("/gradio_api/upload", files={"files": ("big.bin", b"x" * 100_000)})
        assert upload.status_code == 413  # the page has no upload: a rater cannot fill the server's disk


def test_repeated_logins_cannot_fill_the_servers_memory(study, monkeypatch):
    from hgdpo.study import app as study_app

    monkeypatch.setattr(study_app, "MAX_SESSIONS", 3)
    gate = study_app.Gate(study, study_app.Access(password="pw"))
    tokens = [gate.start_session(gate.login("ann", "pw")) for _ in range(5)]
    assert list(gate.sessions) == tokens[2:] and set(gate.sessions.values()) == {"ann"}
