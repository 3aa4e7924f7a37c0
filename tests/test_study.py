"""The pairwise user study: the SQLite store by hand, then the real server over HTTP and in Chromium."""

import csv
import http.client
import http.cookiejar
import importlib.util
import io
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest
from PIL import Image

from hgdpo.inference.infotext import format_parameters, read_png_parameters, save_png
from hgdpo.study.store import AI_LOSER, AI_WINNER, CSV_COLUMNS, Study, format_results, pairs_from_dataset, pairs_from_folders
from hgdpo.study.app import image_pixels_only
from hgdpo.evaluation.winrate import win_rate
from tests.conftest import write_triplets
from trainer import user_study

ROOT = Path(__file__).resolve().parents[1]
USER_STUDY = [sys.executable, str(ROOT / "trainer" / "user_study.py")]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NUM_PAIRS = 6
NUM_RATERS = 50
RATER_PASSWORD, ORGANISER_PASSWORD = "rater-pw", "organiser-pw"
ON_CI = os.environ.get("CI") == "true"  # CI installs both: there a missing one fails instead of skipping
needs_gradio = pytest.mark.skipif(importlib.util.find_spec("gradio") is None and not ON_CI,
                                  reason='the study server needs gradio: pip install ".[test]"')
needs_browser = pytest.mark.skipif(
    (not Path(CHROMIUM).exists() or importlib.util.find_spec("playwright") is None) and not ON_CI,
    reason=f"needs Debian's Chromium at {CHROMIUM} (apt-get install chromium) and playwright (pip install '.[test]')")


def write_model_folders(root: Path, count: int = NUM_PAIRS) -> tuple[Path, Path]:
    """Two folders of PNGs with the same names and prompts: 'candidate' (blue) and 'baseline' (red)."""
    folders = root / "candidate", root / "baseline"
    for folder, colour in zip(folders, ((40, 90, 200), (200, 60, 40))):
        for index in range(count):
            parameters = format_parameters(f"a person number {index}", "", {"Steps": 50, "Seed": 100 + index,
                                                                             "HG-DPO weight": 0.5})
            save_png(Image.new("RGB", (96, 128), colour), folder / f"{index:04d}.png", parameters)
    return folders


@pytest.fixture
def study(tmp_path) -> Study:
    created = Study.create(tmp_path / "study.db", seed="test")
    created.add_pairs(pairs_from_folders(*write_model_folders(tmp_path)))
    return created


def vote_for(study: Study, rater: str, pair_id: int, winner: str) -> bool:
    """Cast the vote that makes ``winner`` ('a', 'b' or 'tie') win, whichever side the rater sees model A on."""
    study.enrol(rater)
    a_on_left = study.show(rater, pair_id).a_on_left
    choice = "tie" if winner == "tie" else "left" if (winner == "a") == a_on_left else "right"
    return study.vote(rater, pair_id, choice)


def vote_through(study: Study, rater: str, winners: list[str]) -> list[int]:
    """Vote on the rater's next pairs, in their order, so that ``winners`` win; return the pair ids."""
    study.enrol(rater)
    voted = []
    for winner in winners:
        pair_id = study.next_pair(rater).pair_id
        assert vote_for(study, rater, pair_id, winner)
        voted.append(pair_id)
    return voted


# --------------------------------------------------------------------------- building a study


def test_pairs_from_folders_take_prompt_and_seed_from_png_text_or_a_prompts_file(tmp_path):
    candidate, baseline = write_model_folders(tmp_path, count=3)
    specs = pairs_from_folders(candidate, baseline)
    assert [(s.name, s.prompt, s.seed, s.model_a, s.model_b) for s in specs] == [
        (f"000{i}.png", f"a person number {i}", 100 + i, "candidate", "baseline") for i in range(3)]
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("name,prompt,seed\n0000.png,first,1\n0001.png,\"second, with a comma\",\n0002.png,third,3\n")
    named = pairs_from_folders(candidate, baseline, "hgdpo", "sft", prompts_csv=prompts)
    assert [(s.prompt, s.seed, s.model_a) for s in named] == [("first", 1, "hgdpo"), ("second, with a comma", None,
                                                                                      "hgdpo"), ("third", 3, "hgdpo")]
    (baseline / "0002.png").unlink()
    with pytest.raises(ValueError, match="same names.*0002.png"):
        pairs_from_folders(candidate, baseline)
    Image.new("RGB", (8, 8)).save(baseline / "0002.png")  # no parameters chunk
    with pytest.raises(ValueError, match="no 'parameters' text chunk"):
        pairs_from_folders(candidate, baseline)


def test_pairs_from_a_triplet_dataset_put_the_ai_winner_as_model_a(tmp_path):
    dataset = write_triplets(tmp_path / "triplets", num_pairs=4)
    specs = pairs_from_dataset(dataset)
    assert len(specs) == 4 and {(s.model_a, s.model_b) for s in specs} == {(AI_WINNER, AI_LOSER)}
    assert all(s.image_a.name.endswith("_win.png") and s.image_b.name.endswith("_lose.png") for s in specs)
    study = Study.create(tmp_path / "study.db")
    assert study.add_pairs(specs) == 4 and study.add_pairs(specs) == 0  # registering again adds nothing


# --------------------------------------------------------------------------- the store


def test_a_vote_is_never_duplicated(study):
    pair_id = study.next_pair("alice").pair_id
    with pytest.raises(ValueError, match="'alice' has not joined the study"):
        study.vote("alice", pair_id, "left")  # only an admitted rater votes
    study.enrol("alice")
    study.enrol("bob")
    assert study.vote("alice", pair_id, "left") is True
    assert study.vote("alice", pair_id, "right") is False  # ignored: the first vote stands
    assert study.vote("bob", pair_id, "right") is True
    with sqlite3.connect(study.path) as connection:
        assert connection.execute("SELECT rater, choice FROM votes ORDER BY id").fetchall() == [
            ("alice", "left"), ("bob", "right")]
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
            connection.execute("INSERT INTO votes (rater, pair, a_on_left, choice, winner, created) "
                               "VALUES ('alice', ?, 1, 'tie', 'tie', 'now')", (pair_id,))
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    with pytest.raises(ValueError, match="no pair 999"):
        study.vote("alice", 999, "left")
    with pytest.raises(ValueError, match="Invalid choice"):
        study.vote("alice", pair_id, "up")
    for bad_rater in ("../alice", "", "+1+2", "a" * 65):
        with pytest.raises(ValueError, match="Invalid rater id"):
            study.vote(bad_rater, pair_id, "left")


def test_a_returning_rater_resumes_in_their_own_reproducible_order(study):
    first = vote_through(study, "alice", ["a", "b"])
    reopened = Study(study.path)  # e.g. the server restarted
    assert str(reopened.progress("alice")) == f"2 / {NUM_PAIRS}"
    rest = vote_through(reopened, "alice", ["tie"] * (NUM_PAIRS - 2))
    assert sorted(first + rest) == list(range(1, NUM_PAIRS + 1))  # every pair exactly once
    assert reopened.next_pair("alice") is None and str(reopened.progress("alice")) == f"{NUM_PAIRS} / {NUM_PAIRS}"
    replay = Study.create(study.path.with_name("replay.db"), seed="test")
    replay.add_pairs(pairs_from_folders(study.path.parent / "candidate", study.path.parent / "baseline"))
    assert vote_through(replay, "alice", ["a"] * NUM_PAIRS) == first + rest  # same seed: same order
    orders = {tuple(vote_through(replay, f"rater{i}", ["a"] * NUM_PAIRS)) for i in range(8)}
    assert len(orders) > 1  # each rater has their own order


def test_sides_are_randomised_per_rater_and_pair_and_recorded_with_the_vote(study):
    raters = [f"r{i}" for i in range(4)]
    shown = {(rater, pair_id): study.show(rater, pair_id).a_on_left for rater in raters
             for pair_id in range(1, NUM_PAIRS + 1)}
    assert shown == {key: Study(study.path).show(*key).a_on_left for key in shown}  # reproducible
    assert set(shown.values()) == {True, False}
    for rater in raters:
        vote_through(study, rater, ["a"] * NUM_PAIRS)
    with sqlite3.connect(study.path) as connection:
        rows = connection.execute("SELECT rater, pair, a_on_left, choice, winner FROM votes").fetchall()
    assert len(rows) == len(shown)
    for rater, pair_id, a_on_left, choice, winner in rows:
        assert bool(a_on_left) == shown[rater, pair_id]
        assert (choice, winner) == ("left" if a_on_left else "right", "a")


def test_results_match_hand_counts(study, tmp_path):
    study.add_pairs(pairs_from_dataset(write_triplets(tmp_path / "triplets", num_pairs=3)))  # pairs 7, 8, 9
    for pair_id, winner in zip(range(1, 7), ["a", "a", "b", "tie", "a", "a"]):
        vote_for(study, "alice", pair_id, winner)
    vote_for(study, "bob", 1, "b")
    vote_for(study, "bob", 2, "a")
    by_models = {(r.model_a, r.model_b): r for r in study.results()}
    folders, dataset = by_models["candidate", "baseline"], by_models[AI_WINNER, AI_LOSER]
    assert (folders.pairs, folders.raters, dataset.pairs, dataset.raters, dataset.win) == (NUM_PAIRS, 2, 3, 0, None)
    win = folders.win
    assert (win.wins, win.losses, win.ties, win.count) == (5, 2, 1, 8)
    assert win.rate == pytest.approx(5.5 / 8)
    expected = win_rate([1] * 5 + [0] * 2 + [0.5])
    assert (win.low, win.high) == (expected.low, expected.high) and win.low < win.rate < win.high
    vote_for(study, "carol", 7, "a")
    vote_for(study, "carol", 8, "tie")
    agreement = {(r.model_a, r.model_b): r for r in study.results()}[AI_WINNER, AI_LOSER].win
    assert (agreement.rate, agreement.wins, agreement.ties, agreement.losses) == (0.75, 1, 1, 0)
    table = format_results(study.results())
    assert "| candidate | baseline | 6 | 2 | 8 | 5 | 2 | 1 | 68.8% |" in table


def test_csv_export_has_one_row_per_vote(study, tmp_path):
    vote_for(study, "alice", 3, "b")
    vote_for(study, "bob", 3, "tie")
    vote_for(study, "bob", 3, "a")  # ignored
    assert study.export_csv(tmp_path / "votes.csv") == 2
    rows = list(csv.DictReader(io.StringIO((tmp_path / "votes.csv").read_text())))
    assert list(rows[0]) == list(CSV_COLUMNS) and len(rows) == 2
    alice, bob = rows
    assert (alice["rater"], alice["pair_name"], alice["prompt"], alice["seed"]) == ("alice", "0002.png",
                                                                                    "a person number 2", "102")
    assert (alice["model_a"], alice["model_b"], alice["winner"], bob["winner"]) == ("candidate", "baseline",
                                                                                    "baseline", "tie")
    sides = {"alice": study.show("alice", 3).a_on_left, "bob": study.show("bob", 3).a_on_left}
    for row in rows:
        assert row["left_model"] == ("candidate" if sides[row["rater"]] else "baseline")
        assert Path(row["image_a"]).parent.name == "candidate" and Path(row["image_b"]).parent.name == "baseline"
    assert alice["choice"] == ("right" if sides["alice"] else "left")


def test_served_pngs_keep_their_pixels_and_lose_their_generation_parameters(tmp_path):
    path = save_png(
        Image.new("RGB", (5, 4), (1, 2, 3)), tmp_path / "a.png", "a prompt\nSteps: 5, Seed: 1, HG-DPO weight: 0.5"
    )
    assert read_png_parameters(path)
    stripped = image_pixels_only(path.read_bytes())
    image = Image.open(io.BytesIO(stripped))
    assert "parameters" not in image.info and np.array_equal(np.asarray(image), np.asarray(Image.open(path)))
    with pytest.raises(ValueError, match="not a PNG, JPEG or WebP"):
        image_pixels_only(b"<svg onload=alert(1)>")


def test_served_bmps_become_png_pixels_like_the_datasets_images(tmp_path):
    image = Image.new("RGB", (5, 4), (1, 2, 3))
    buffer = io.BytesIO()
    image.save(buffer, "BMP")
    served = Image.open(io.BytesIO(image_pixels_only(buffer.getvalue())))
    assert served.format == "PNG" and np.array_equal(np.asarray(served), np.asarray(image))


# --------------------------------------------------------------------------- command line


def test_command_line_creates_reports_and_exports(tmp_path, capsys, monkeypatch):
    candidate, baseline = write_model_folders(tmp_path, count=3)
    database = str(tmp_path / "cli.db")
    assert user_study.main(["create", database, "--folders", str(candidate), str(baseline),
                            "--names", "hgdpo", "sft"]) == 0
    assert user_study.main(["create", database, "--dataset", str(write_triplets(tmp_path / "data", 2))]) == 0
    assert "3 new pairs of hgdpo vs sft" in capsys.readouterr().out
    vote_for(Study(database), "alice", 1, "a")
    assert user_study.main(["results", database]) == 0
    assert "| hgdpo | sft | 3 | 1 | 1 | 1 | 0 | 0 | 100.0% |" in capsys.readouterr().out
    assert user_study.main(["export", database, str(tmp_path / "v.csv")]) == 0
    assert "Wrote 1 votes" in capsys.readouterr().out
    assert user_study.main(["results", str(tmp_path / "missing.db")]) == 1
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if the app extra were not installed
    assert user_study.main(["serve", database]) == 1
    assert 'pip install ".[app]"' in capsys.readouterr().err


# --------------------------------------------------------------------------- the running server


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_request(base: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """A GET with the path sent exactly as given (no client-side normalisation of ``..``): status, headers, body."""
    host, port = base.removeprefix("http://").rstrip("/").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, {key.lower(): value for key, value in response.getheaders()}, response.read()
    finally:
        connection.close()


def http_get(base: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    status, _, body = http_request(base, path, headers)
    return status, body


class RaterSession:
    """One client of the study server with its own cookies (the session the server gives it at login)."""

    def __init__(self, base: str) -> None:
        self.base, self.cookies = base, http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.cookies))

    def open(self, path: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, str]:
        """Status and text of a request (redirects followed), also for an error status."""
        request = urllib.request.Request(f"{self.base}{path}", data=data, headers=headers or {})
        try:
            with self.opener.open(request, timeout=60) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def login(self, name: str, password: str = "") -> tuple[int, str]:
        return self.open("/study/login", urlencode({"name": name, "password": password}).encode())

    def cookie_header(self) -> dict[str, str]:
        return {"Cookie": "; ".join(f"{cookie.name}={cookie.value}" for cookie in self.cookies)}

    def call(self, api_name: str, data: list, query: str = "") -> tuple[str, object]:
        """Call one of the page's events through gradio's HTTP API: (last event name, its data)."""
        status, text = self.open(f"/gradio_api/call/{api_name}{query}", json.dumps({"data": data}).encode(),
                                 {"Content-Type": "application/json"})
        assert status == 200, (status, text)
        status, stream = self.open(f"/gradio_api/call/{api_name}/{json.loads(text)['event_id']}")
        *_, event, data_line = stream.strip().splitlines()
        return event.removeprefix("event: "), json.loads(data_line.removeprefix("data: "))

    def outputs(self, api_name: str, data: list, query: str = "") -> list:
        """The outputs of an event that must complete: [progress line, pair view, pair id, buttons]."""
        event, outputs = self.call(api_name, data, query)
        assert event == "complete", (event, outputs)
        return outputs


def login_page_up(base: str) -> bool:
    try:
        return http_get(base, "/study/login")[0] == 200
    except OSError:
        return False


@contextmanager
def running_server(study_path: Path, *options: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """``user_study.py serve`` on a free port of 127.0.0.1; yields its base URL."""
    port = free_port()
    process = subprocess.Popen(USER_STUDY + ["serve", str(study_path), "--port", str(port), *options],
                               env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while not login_page_up(base):
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "the study server did not start in 90 s"
            time.sleep(0.25)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


SERVER_ENV = {"HGDPO_STUDY_PASSWORD": RATER_PASSWORD, "HGDPO_STUDY_ORGANISER_PASSWORD": ORGANISER_PASSWORD}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A served study with the raters' and the organiser's passwords; yields (base URL, study)."""
    root = tmp_path_factory.mktemp("served")
    study = Study.create(root / "study.db", seed="served")
    study.add_pairs(pairs_from_folders(*write_model_folders(root)))
    with running_server(study.path, "--max-raters", str(NUM_RATERS + 10), env=SERVER_ENV) as base:
        yield base, study


def rate_everything(base: str, rater: str) -> list[tuple[int, str]]:
    """One simulated rater: log in, vote on each pair shown until done (bounded), then re-vote once."""
    session = RaterSession(base)
    assert session.login(rater, RATER_PASSWORD)[0] == 200
    outputs, sent = session.outputs("current", []), []
    for step in range(NUM_PAIRS + 1):
        pair_id = outputs[2]
        if pair_id is None:
            break
        choice = ("left", "right", "tie")[(len(rater) + step) % 3]
        outputs = session.outputs(f"vote_{choice}", [pair_id])
        sent.append((pair_id, choice))
    assert outputs[2] is None and f"{NUM_PAIRS} / {NUM_PAIRS}" in outputs[0]
    session.outputs("vote_tie", [sent[0][0]])  # a repeated vote must be ignored
    return sent


@needs_gradio
def test_fifty_concurrent_raters_over_http_lose_no_vote(server):
    base, study = server
    raters = [f"sim-{index}" for index in range(NUM_RATERS)]
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=NUM_RATERS) as pool:
        sent = dict(zip(raters, pool.map(partial(rate_everything, base), raters)))
    print(f"{NUM_RATERS} raters cast {NUM_RATERS * NUM_PAIRS} votes in {time.monotonic() - started:.1f} s")
    with sqlite3.connect(study.path) as connection:
        stored = connection.execute("SELECT rater, pair, choice FROM votes WHERE rater LIKE 'sim-%'").fetchall()
    assert len(stored) == sum(len(votes) for votes in sent.values()) == NUM_RATERS * NUM_PAIRS
    assert sorted(stored) == sorted((rater, pair, choice) for rater, votes in sent.items() for pair, choice in votes)


@needs_gradio
def test_only_registered_images_are_served(server):
    base, study = server
    token = study.next_pair("someone").left_image
    assert http_get(base, f"/study/image/{token}")[0] == 401  # not logged in
    session = RaterSession(base)
    assert session.login("someone", RATER_PASSWORD)[0] == 200
    logged_in = session.cookie_header()
    status, body = http_get(base, f"/study/image/{token}", logged_in)
    assert status == 200 and Image.open(io.BytesIO(body)).size == (96, 128)
    assert b"parameters" not in body and b"HG-DPO" not in body
    registered = study.image_path(token)
    for path in ("/study/image/unknown-token", "/study/image/../../../../etc/passwd",
                 "/study/image/..%2F..%2F..%2F..%2Fetc%2Fpasswd", "/study/image/%2Fetc%2Fpasswd",
                 f"/study/image/{registered}", "/study/image/../study.db", "/gradio_api/file=/etc/passwd",
                 f"/gradio_api/file={registered}", f"/gradio_api/file={study.path}", "/study/../etc/passwd"):
        for headers in ({}, logged_in):
            status, body = http_get(base, path, headers)
            assert status in (400, 401, 403, 404), (path, status)
            assert b"root:" not in body and not body.startswith(b"\x89PNG") and b"SQLite" not in body, path


@needs_gradio
def test_a_password_guards_the_page_and_the_images(tmp_path):
    from fastapi.testclient import TestClient

    from hgdpo.study.app import Access, build_app

    study = Study.create(tmp_path / "study.db")
    study.add_pairs(pairs_from_folders(*write_model_folders(tmp_path, count=1)))
    token = study.next_pair("x").left_image
    with TestClient(build_app(study, Access(password="s3cret"))) as client:
        for path in (f"/study/image/{token}", "/config", "/gradio_api/info"):
            assert client.get(path).status_code == 401, path
        assert client.get("/study/votes.csv").status_code == 404  # no organiser password: no results at all
        first = client.get("/", follow_redirects=False)
        assert (first.status_code, first.headers["location"]) == (303, "study/login")
        refused = client.post("/study/login", data={"name": "ann", "password": "wrong"})
        assert refused.status_code == 401 and "Wrong name or password" in refused.text
        assert client.get(f"/study/image/{token}").status_code == 401
        assert client.post("/study/login", data={"name": "ann", "password": "s3cret"}).status_code == 200
        assert client.get(f"/study/image/{token}").status_code == 200
        assert client.get("/study/logout").status_code == 200  # back on the login page
        assert client.get(f"/study/image/{token}").status_code == 401
    assert [rater.rater for rater in study.raters()] == ["ann"]


# --------------------------------------------------------------------------- in a real browser


@needs_gradio
@needs_browser
def test_votes_cast_in_chromium_by_click_and_keyboard(server):
    from playwright.sync_api import sync_playwright

    base, study = server
    anna_link = f"{base}/study/enter?key={study.issue_key('anna')}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(15_000)
            page.goto(f"{base}/?rater=anna")  # no session: the login page (a rater id in the URL counts for nothing)
            page.fill("input[name=name]", "browser")
            page.fill("input[name=password]", RATER_PASSWORD)
            page.get_by_role("button", name="Start").click()
            progress = page.locator("#study-progress")
            for done, action in enumerate([lambda: page.click("#vote-left"), lambda: page.keyboard.press("ArrowRight"),
                                           lambda: page.keyboard.press("ArrowDown")]):
                progress.filter(has_text=f"browser · {done} / {NUM_PAIRS}").wait_for()
                page.wait_for_function("[...document.querySelectorAll('#study-pair img')]"  # both images served
                                       ".filter(image => image.complete && image.naturalWidth === 96).length === 2")
                action()
            progress.filter(has_text=f"browser · 3 / {NUM_PAIRS}").wait_for()
            page.goto(f"{base}/?rater=anna")  # coming back later: resumes as the same rater
            progress.filter(has_text=f"browser · 3 / {NUM_PAIRS}").wait_for()
            assert page.get_by_role("tab", name="Results").count() == 0 and "candidate" not in page.content()
            linked = browser.new_page()
            linked.goto(anna_link)  # a personal link logs its rater in
            linked.locator("#study-progress").filter(has_text=f"anna · 0 / {NUM_PAIRS}").wait_for()
            organiser = browser.new_context(http_credentials={"username": "me", "password": ORGANISER_PASSWORD})
            results = organiser.new_page()
            results.goto(f"{base}/study/results")
            assert "| candidate | baseline |" in results.inner_text("body")
        finally:
            browser.close()
    with sqlite3.connect(study.path) as connection:
        votes = connection.execute(
            "SELECT choice, a_on_left, winner FROM votes WHERE rater = 'browser' ORDER BY id").fetchall()
        assert connection.execute("SELECT COUNT(*) FROM votes WHERE rater = 'anna'").fetchone() == (0,)
    assert [choice for choice, _, _ in votes] == ["left", "right", "tie"]
    for choice, a_on_left, winner in votes:
        assert winner == ("tie" if choice == "tie" else "a" if (choice == "left") == bool(a_on_left) else "b")
