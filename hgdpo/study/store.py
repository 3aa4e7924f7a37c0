"""The pairwise user study's store: registered images and pairs, raters and their votes in SQLite.

Framework-free (the web app in :mod:`hgdpo.study.app` is a thin layer over it). One study is one
SQLite file in WAL mode; every operation opens its own connection, and each vote is one
``BEGIN IMMEDIATE`` transaction, so concurrent raters (threads or processes) wait on ``busy_timeout``
instead of failing. A vote is unique per (rater, pair): voting again on the same pair is ignored.

A pair shows two images of the same prompt (and seed): either one image of model A and one of model B
(the study measures how often raters prefer A, paper Figure 3), or the winner and the loser of a
triplet dataset (:func:`pairs_from_dataset`: how often humans agree with the AI feedback, paper
Figure 5a; model A is the AI's winner). Each rater sees the pairs in their own order, and each pair with its own
left/right sides, both derived from the study's seed, the rater id and the pair id, so they are reproducible; the side
shown is recorded with each vote. Images are known to raters only by a random token, so nothing in a
page tells which model made which image.

Raters are admitted, never just named: :meth:`Study.issue_key` gives a rater a random access key (their link or
password; only its SHA-256 is stored) and :meth:`Study.enrol` admits a new rater id up to a cap; only an admitted
rater can vote. Every registered image is a resolved path with an image suffix, inside the folder or dataset it
comes from (a symlink or an index entry pointing elsewhere is refused).

Two folders of generated images (:func:`pairs_from_folders`) are matched by file name::

    baseline/0000.png  baseline/0001.png ...
    candidate/0000.png candidate/0001.png ...

The prompt (and seed) of each name comes from a prompts CSV with columns ``name, prompt[, seed]``,
or else from the PNG ``parameters`` text chunk (the WebUI's convention, :mod:`hgdpo.inference.infotext`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import secrets
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError

from hgdpo.fileio import IMAGE_SUFFIXES, atomic_path, atomic_write_text, image_inside
from hgdpo.inference.infotext import parse_parameters, read_png_parameters
from hgdpo.evaluation.winrate import WinRate, win_rate_of_counts

__all__ = [
    "AI_LOSER",
    "AI_WINNER",
    "PairResult",
    "PairSpec",
    "Progress",
    "RaterInfo",
    "Shown",
    "Study",
    "StudyFull",
    "check_rater",
    "format_results",
    "pairs_from_dataset",
    "pairs_from_folders",
]

SCHEMA_VERSION = 2
BUSY_TIMEOUT_MS = 30_000
KEEP_INSIDE = "keep the study's images inside it"
AI_WINNER, AI_LOSER = "ai-winner", "ai-loser"
RATER_PATTERN = re.compile(r"\w[\w.@+-]{0,63}")  # no leading + - @ (a formula in a spreadsheet)
SEED_RANGE = (-(2**63), 2**63 - 1)  # what SQLite's INTEGER holds
SQLITE_HEADER = b"SQLite format 3\x00"
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet evaluates a cell starting with one of these
Choice = Literal["left", "right", "tie"]
CHOICES: tuple[Choice, ...] = ("left", "right", "tie")
CSV_COLUMNS = ("vote_id", "created", "rater", "pair_id", "pair_name", "prompt", "seed", "model_a", "model_b",
               "image_a", "image_b", "left_model", "choice", "winner")

_KEYS_SCHEMA = """
CREATE TABLE rater_keys (rater TEXT PRIMARY KEY REFERENCES raters(id), key_hash TEXT NOT NULL UNIQUE,
                         created TEXT NOT NULL);
"""
_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE images (id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, token TEXT NOT NULL UNIQUE);
CREATE TABLE pairs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    prompt TEXT NOT NULL,
    seed INTEGER,
    model_a TEXT NOT NULL,
    model_b TEXT NOT NULL,
    image_a INTEGER NOT NULL REFERENCES images(id),
    image_b INTEGER NOT NULL REFERENCES images(id),
    UNIQUE (model_a, model_b, name),
    CHECK (model_a <> model_b)
);
CREATE TABLE raters (id TEXT PRIMARY KEY, first_seen TEXT NOT NULL);
CREATE TABLE votes (
    id INTEGER PRIMARY KEY,
    rater TEXT NOT NULL REFERENCES raters(id),
    pair INTEGER NOT NULL REFERENCES pairs(id),
    a_on_left INTEGER NOT NULL CHECK (a_on_left IN (0, 1)),
    choice TEXT NOT NULL CHECK (choice IN ('left', 'right', 'tie')),
    winner TEXT NOT NULL CHECK (winner IN ('a', 'b', 'tie')),
    created TEXT NOT NULL,
    UNIQUE (rater, pair)
);
""" + _KEYS_SCHEMA


class StudyFull(ValueError):
    """A new rater id was refused: the study already has its maximum number of raters."""


@dataclass(frozen=True)
class PairSpec:
    """A pair to register: two image files of the same prompt from ``model_a`` and ``model_b``."""

    name: str
    prompt: str
    image_a: Path
    image_b: Path
    model_a: str
    model_b: str
    seed: int | None = None


@dataclass(frozen=True)
class Shown:
    """A pair as one rater sees it: the opaque tokens of the images on each side."""

    pair_id: int
    prompt: str
    left_image: str
    right_image: str
    a_on_left: bool


@dataclass(frozen=True)
class Progress:
    """How many of the study's pairs a rater has voted on."""

    done: int
    total: int

    def __str__(self) -> str:
        return f"{self.done} / {self.total}"


@dataclass(frozen=True)
class PairResult:
    """The votes of one model pair: model A's win rate (ties half) or None before the first vote."""

    model_a: str
    model_b: str
    pairs: int
    raters: int
    win: WinRate | None


@dataclass(frozen=True)
class RaterInfo:
    """One admitted rater: since when, how many votes, and whether they hold an access key."""

    rater: str
    first_seen: str
    votes: int
    has_key: bool


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_rater(rater: str) -> str:
    """The rater id stripped: 1 to 64 letters, digits and ``_ . @ + -``, starting with a letter, digit or ``_``."""
    rater = rater.strip()
    if not RATER_PATTERN.fullmatch(rater):
        raise ValueError(f"Invalid rater id {rater!r}: use 1-64 letters, digits or _ . @ + -, starting with a letter")
    return rater


class Study:
    """One user study stored in a SQLite file (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"No user-study database at {self.path} (create one first).")
        try:
            with self._connect() as connection:
                meta = dict(connection.execute("SELECT key, value FROM meta"))
        except sqlite3.DatabaseError as error:
            raise ValueError(f"{self.path} is not a user-study database: {error}") from None
        if meta.get("schema_version") == "1":
            self._upgrade_from_version_1()
        elif meta.get("schema_version") != str(SCHEMA_VERSION):
            raise ValueError(f"{self.path}: unsupported user-study schema version {meta.get('schema_version')}")
        self.seed = meta["seed"]

    @classmethod
    def create(cls, path: str | Path, seed: str | None = None) -> Study:
        """Create an empty study at ``path``; an existing study is opened as it is (a different seed is refused)."""
        path = Path(path)
        if not path.exists():
            with atomic_path(path) as tmp:  # a study file is complete or absent
                _write_schema(tmp, seed or secrets.token_hex(8))
        study = cls(path)
        if seed is not None and seed != study.seed:
            raise ValueError(f"{path} is an existing study with its own seed: leave the seed out to add pairs to it")
        return study

    def _upgrade_from_version_1(self) -> None:
        """Version 2 adds the raters' access keys; nothing else changes."""
        with self._transaction() as connection:
            connection.execute(_KEYS_SCHEMA.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS"))
            connection.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        connection = sqlite3.connect(self.path, isolation_level=None)
        try:
            connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            connection.execute("PRAGMA foreign_keys = ON")
            yield connection
        finally:
            connection.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as connection:
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    def files(self) -> list[Path]:
        """The database file and the SQLite side files next to it (write-ahead log, shared memory, journal)."""
        return [self.path] + [self.path.with_name(self.path.name + suffix) for suffix in ("-wal", "-shm", "-journal")]

    # ---- registering ----------------------------------------------------------------------------

    def add_pairs(self, specs: Iterable[PairSpec]) -> int:
        """Register pairs and their images in one transaction; return how many were new."""
        added = 0
        with self._transaction() as connection:
            for spec in specs:
                _check_spec(spec)
                cursor = connection.execute(
                    "INSERT OR IGNORE INTO pairs (name, prompt, seed, model_a, model_b, image_a, image_b) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (spec.name, spec.prompt, spec.seed, spec.model_a, spec.model_b,
                     _image_id(connection, spec.image_a), _image_id(connection, spec.image_b)))
                added += cursor.rowcount
        return added

    def image_path(self, token: str) -> Path | None:
        """The file of a registered image, or None for a token the study does not hold."""
        with self._connect() as connection:
            row = connection.execute("SELECT path FROM images WHERE token = ?", (token,)).fetchone()
        return None if row is None else Path(row[0])

    # ---- raters ---------------------------------------------------------------------------------

    def enrol(self, rater: str, max_raters: int | None = None) -> str:
        """Admit a rater (idempotent); a new one is refused with :class:`StudyFull` once ``max_raters`` are in."""
        rater = check_rater(rater)
        with self._transaction() as connection:
            if connection.execute("SELECT 1 FROM raters WHERE id = ?", (rater,)).fetchone() is not None:
                return rater
            count = connection.execute("SELECT COUNT(*) FROM raters").fetchone()[0]
            if max_raters is not None and count >= max_raters:
                raise StudyFull(f"The study is full ({count} raters): {rater!r} cannot join; ask the organiser "
                                "for a link or to allow more raters")
            connection.execute("INSERT INTO raters VALUES (?, ?)", (rater, _now()))
        return rater

    def issue_key(self, rater: str, replace: bool = False) -> str:
        """Admit ``rater`` with a new random access key and return it (only its hash is stored).

        A rater who holds a key already is refused unless ``replace`` (then their old key stops working).
        """
        rater, key = check_rater(rater), secrets.token_urlsafe(18)
        with self._transaction() as connection:
            connection.execute("INSERT OR IGNORE INTO raters VALUES (?, ?)", (rater, _now()))
            if connection.execute("SELECT 1 FROM rater_keys WHERE rater = ?", (rater,)).fetchone() and not replace:
                raise ValueError(f"Rater {rater!r} holds a key already: replace it explicitly (their old link and "
                                 "password then stop working)")
            connection.execute("INSERT OR REPLACE INTO rater_keys VALUES (?, ?, ?)", (rater, _key_hash(key), _now()))
        return key

    def key_owner(self, key: str) -> str | None:
        """The rater holding access key ``key``, or None."""
        with self._connect() as connection:
            row = connection.execute("SELECT rater FROM rater_keys WHERE key_hash = ?", (_key_hash(key),)).fetchone()
        return None if row is None else row[0]

    def has_key(self, rater: str | None = None) -> bool:
        """Whether ``rater`` holds an access key (None: whether any rater does)."""
        query, parameters = ("SELECT 1 FROM rater_keys", ()) if rater is None else (
            "SELECT 1 FROM rater_keys WHERE rater = ?", (rater,))
        with self._connect() as connection:
            return connection.execute(query, parameters).fetchone() is not None

    def raters(self) -> list[RaterInfo]:
        """Every admitted rater, in the order they joined."""
        with self._connect() as connection:
            rows = connection.execute(
                "SELECT r.id, r.first_seen, (SELECT COUNT(*) FROM votes v WHERE v.rater = r.id), "
                "EXISTS (SELECT 1 FROM rater_keys k WHERE k.rater = r.id) FROM raters r ORDER BY r.first_seen, r.id"
            ).fetchall()
        return [RaterInfo(rater, first_seen, votes, bool(has_key)) for rater, first_seen, votes, has_key in rows]

    # ---- rating ---------------------------------------------------------------------------------

    def _assignment(self, rater: str, pair_id: int) -> tuple[int, bool]:
        """(position in the rater's order, whether model A is on the left), reproducible from the seed."""
        digest = hashlib.sha256(f"{self.seed}\0{rater}\0{pair_id}".encode()).digest()
        return int.from_bytes(digest[:8], "big"), bool(digest[8] & 1)

    def next_pair(self, rater: str) -> Shown | None:
        """The first pair in the rater's order they have not voted on, or None when they are done."""
        rater = check_rater(rater)
        with self._connect() as connection:
            remaining = [row[0] for row in connection.execute(
                "SELECT id FROM pairs WHERE id NOT IN (SELECT pair FROM votes WHERE rater = ?)", (rater,))]
        if not remaining:
            return None
        return self.show(rater, min(remaining, key=lambda pair_id: self._assignment(rater, pair_id)[0]))

    def show(self, rater: str, pair_id: int) -> Shown:
        """A pair as this rater sees it."""
        with self._connect() as connection:
            row = connection.execute(
                "SELECT p.prompt, ia.token, ib.token FROM pairs p JOIN images ia ON ia.id = p.image_a "
                "JOIN images ib ON ib.id = p.image_b WHERE p.id = ?", (pair_id,)).fetchone()
        if row is None:
            raise ValueError(f"The study has no pair {pair_id}")
        prompt, image_a, image_b = row
        a_on_left = self._assignment(rater, pair_id)[1]
        left, right = (image_a, image_b) if a_on_left else (image_b, image_a)
        return Shown(pair_id=pair_id, prompt=prompt, left_image=left, right_image=right, a_on_left=a_on_left)

    def vote(self, rater: str, pair_id: int, choice: Choice) -> bool:
        """Record an admitted rater's vote on a pair in one transaction; False (nothing written) if already voted."""
        rater = check_rater(rater)
        if choice not in CHOICES:
            raise ValueError(f"Invalid choice {choice!r}: expected one of {', '.join(CHOICES)}")
        a_on_left = self._assignment(rater, pair_id)[1]
        winner = "tie" if choice == "tie" else "a" if (choice == "left") == a_on_left else "b"
        with self._transaction() as connection:
            if connection.execute("SELECT 1 FROM pairs WHERE id = ?", (pair_id,)).fetchone() is None:
                raise ValueError(f"The study has no pair {pair_id}")
            if connection.execute("SELECT 1 FROM raters WHERE id = ?", (rater,)).fetchone() is None:
                raise ValueError(f"Rater {rater!r} has not joined the study: enrol them first")
            cursor = connection.execute(
                "INSERT OR IGNORE INTO votes (rater, pair, a_on_left, choice, winner, created) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (rater, pair_id, int(a_on_left), choice, winner, _now()),
            )
            recorded = cursor.rowcount == 1
        return recorded

    def progress(self, rater: str) -> Progress:
        """How many pairs the rater has voted on, out of all pairs."""
        rater = check_rater(rater)
        with self._connect() as connection:
            done = connection.execute("SELECT COUNT(*) FROM votes WHERE rater = ?", (rater,)).fetchone()[0]
            total = connection.execute("SELECT COUNT(*) FROM pairs").fetchone()[0]
        return Progress(done=done, total=total)

    # ---- reading out ----------------------------------------------------------------------------

    def vote_count(self) -> int:
        """All votes of all raters."""
        with self._connect() as connection:
            return connection.execute("SELECT COUNT(*) FROM votes").fetchone()[0]

    def results(self) -> list[PairResult]:
        """Per model pair: model A's share of the votes (ties half) with its bootstrap 95% interval."""
        with self._connect() as connection:
            model_pairs = connection.execute(
                "SELECT model_a, model_b, COUNT(*) FROM pairs GROUP BY model_a, model_b ORDER BY model_a, model_b"
            ).fetchall()
            results = []
            for model_a, model_b, pairs in model_pairs:
                counts = dict(connection.execute(
                    "SELECT v.winner, COUNT(*) FROM votes v JOIN pairs p ON p.id = v.pair "
                    "WHERE p.model_a = ? AND p.model_b = ? GROUP BY v.winner", (model_a, model_b)))
                raters = connection.execute(
                    "SELECT COUNT(DISTINCT v.rater) FROM votes v JOIN pairs p ON p.id = v.pair "
                    "WHERE p.model_a = ? AND p.model_b = ?", (model_a, model_b)).fetchone()[0]
                results.append(PairResult(model_a, model_b, pairs, raters, _win_rate(counts)))
        return results

    def votes_csv(self) -> str:
        """Every vote as CSV text, one row per vote (columns: ``CSV_COLUMNS``).

        A text cell that a spreadsheet would run as a formula (starting with ``= + - @``) gets a leading ``'``.
        """
        query = """
            SELECT v.id, v.created, v.rater, p.id, p.name, p.prompt, p.seed, p.model_a, p.model_b, ia.path, ib.path,
                   CASE v.a_on_left WHEN 1 THEN p.model_a ELSE p.model_b END, v.choice,
                   CASE v.winner WHEN 'a' THEN p.model_a WHEN 'b' THEN p.model_b ELSE 'tie' END
            FROM votes v JOIN pairs p ON p.id = v.pair
                 JOIN images ia ON ia.id = p.image_a JOIN images ib ON ib.id = p.image_b
            ORDER BY v.id"""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        with self._connect() as connection:
            writer.writerows([_csv_safe(cell) for cell in row] for row in connection.execute(query))
        return buffer.getvalue()

    def export_csv(self, path: str | Path, overwrite: bool = False) -> int:
        """Write :meth:`votes_csv` to a ``.csv`` file atomically; return the number of votes.

        Refused: another suffix, the study's own files or any SQLite database, a folder, and an existing file
        unless ``overwrite``.
        """
        target = Path(path)
        _check_export_target(target, self.files(), overwrite)
        text = self.votes_csv()
        atomic_write_text(target, text)
        return text.count("\n") - 1


def format_results(results: Iterable[PairResult]) -> str:
    """The results as a Markdown table, one row per model pair."""
    lines = ["| Model A | Model B | Pairs | Raters | Votes | A wins | B wins | Ties | Win rate of A | 95% interval |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for result in results:
        cells: list[object] = [result.model_a, result.model_b, result.pairs, result.raters]
        win = result.win
        if win is None:
            cells += [0, 0, 0, 0, "no votes yet", ""]
        else:
            cells += [win.count, win.wins, win.losses, win.ties, f"{win.rate:.1%}", f"{win.low:.1%} - {win.high:.1%}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def _write_schema(path: Path, seed: str) -> None:
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode = WAL")
        connection.executescript(_SCHEMA)
        connection.executemany("INSERT INTO meta VALUES (?, ?)",
                               [("schema_version", str(SCHEMA_VERSION)), ("seed", seed)])
    finally:
        connection.close()


def _check_spec(spec: PairSpec) -> None:
    if not spec.prompt.strip():
        raise ValueError(f"Pair {spec.name!r} has an empty prompt: give it one (prompts CSV or PNG parameters)")
    if not spec.model_a.strip() or not spec.model_b.strip():
        raise ValueError(f"Pair {spec.name!r}: a model name is empty: name both models")
    if spec.model_a == spec.model_b:
        raise ValueError(f"Pair {spec.name!r}: both sides are model {spec.model_a!r}: name the two models apart")
    for image in (spec.image_a, spec.image_b):
        resolved = Path(image).resolve()
        if resolved.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"Pair {spec.name!r}: {image} is not an image file: use {', '.join(IMAGE_SUFFIXES)}")
        if not resolved.is_file():
            raise FileNotFoundError(f"Pair {spec.name!r}: no image file {image}")


def _check_export_target(target: Path, study_files: list[Path], overwrite: bool) -> None:
    """Refuse to write the votes anywhere but a new (or, with ``overwrite``, an existing plain) ``.csv`` file."""
    if target.suffix.lower() != ".csv":
        raise ValueError(f"{target}: the votes file must end in .csv: name it e.g. votes.csv")
    if not target.exists():
        return
    if any(study_file.exists() and os.path.samefile(target, study_file) for study_file in study_files):
        raise ValueError(f"{target} is the study database itself: export to another file, e.g. votes.csv")
    if not target.is_file():
        raise ValueError(f"{target} is not a file: give the path of a .csv file to write")
    with open(target, "rb") as handle:
        if handle.read(len(SQLITE_HEADER)) == SQLITE_HEADER:
            raise ValueError(f"{target} is a SQLite database, not a CSV file: export to another file")
    if not overwrite:
        raise ValueError(f"{target} exists: choose another name, or overwrite it explicitly (--force)")


def _csv_safe(cell: Any) -> Any:
    return f"'{cell}" if isinstance(cell, str) and cell.startswith(FORMULA_PREFIXES) else cell


def _image_id(connection: sqlite3.Connection, image: Path) -> int:
    path = str(Path(image).resolve())
    connection.execute("INSERT OR IGNORE INTO images (path, token) VALUES (?, ?)", (path, secrets.token_urlsafe(16)))
    return connection.execute("SELECT id FROM images WHERE path = ?", (path,)).fetchone()[0]


def _win_rate(counts: dict[str, int]) -> WinRate | None:
    """Model A's win rate from the vote counts (ties half), or None before the first vote."""
    if not any(counts.values()):
        return None
    return win_rate_of_counts(counts.get("a", 0), counts.get("b", 0), counts.get("tie", 0))


# ---- building pairs -----------------------------------------------------------------------------


def _readable_image(path: Path, what: str) -> Path:
    """``path``, refused unless Pillow reads it as a PNG, JPEG, WebP or BMP image (the server sends only those)."""
    try:
        with Image.open(path, formats=("PNG", "JPEG", "WEBP", "BMP")) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"{what}: {path} is not a readable PNG, JPEG or WebP image (or BMP) ({error}): "
                         "replace or remove it") from None
    return path


def _images_by_name(folder: Path) -> dict[str, Path]:
    """``name -> resolved path`` of the folder's images; one leading outside the folder, or unreadable, is refused."""
    if not folder.is_dir():
        raise FileNotFoundError(f"No image folder {folder}")
    what = f"image folder {folder}"
    return {path.name: _readable_image(image_inside(folder, path.name, f"{what}: {path}", keep=KEEP_INSIDE), what)
            for path in sorted(folder.iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()}


def _parse_seed(text: str | None, where: str, fix: str) -> int | None:
    """A seed from text: empty means none; else a whole number SQLite can hold."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        seed = int(text)
    except ValueError:
        raise ValueError(f"{where}: seed {text!r} is not a whole number: {fix}") from None
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ValueError(f"{where}: seed {text} is out of range (-2**63 to 2**63-1): {fix}")
    return seed


def _read_prompts_csv(path: Path) -> dict[str, tuple[str, int | None]]:
    """``name -> (prompt, seed)`` from a CSV with columns ``name, prompt[, seed]``; a bad row names its line."""
    if not path.is_file():
        raise FileNotFoundError(f"No prompts file {path}: give a CSV with columns name, prompt[, seed]")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}): save it as UTF-8") from None
    if "\x00" in text:
        raise ValueError(f"{path} holds NUL bytes, so it is no CSV text: save the prompts as a UTF-8 CSV file")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        return _prompt_rows(path, reader)
    except csv.Error as error:
        raise ValueError(f"{path} line {reader.line_num}: {error}: write each row as name,prompt[,seed]") from None


def _prompt_rows(path: Path, reader: csv.DictReader) -> dict[str, tuple[str, int | None]]:
    fix = "write each row as name,prompt[,seed] (quote a prompt with commas)"
    columns = reader.fieldnames or []
    if not {"name", "prompt"} <= set(columns):
        raise ValueError(f"{path}: expected CSV columns name, prompt[, seed]; found {', '.join(columns) or 'none'}")
    prompts: dict[str, tuple[str, int | None]] = {}
    lines: dict[str, int] = {}
    for row in reader:
        where, name, prompt = f"{path} line {reader.line_num}", (row["name"] or "").strip(), row["prompt"] or ""
        if None in row:
            raise ValueError(f"{where}: more cells than the {len(columns)} columns of the header: {fix}")
        if not name:
            raise ValueError(f"{where}: no image name: {fix}")
        if not prompt.strip():
            raise ValueError(f"{where}: no prompt for {name!r}: {fix}")
        if name in lines:
            raise ValueError(f"{where}: {name!r} is listed again (first on line {lines[name]}): keep one row each")
        lines[name] = reader.line_num
        prompts[name] = (prompt, _parse_seed(row.get("seed"), where, "write a whole number or leave it empty"))
    return prompts


def _png_prompt(image: Path) -> tuple[str, int | None]:
    """(prompt, seed) from an image's ``parameters`` text chunk."""
    parameters = read_png_parameters(image)
    if not parameters:
        raise ValueError(f"{image} has no 'parameters' text chunk: pass a prompts CSV (name, prompt[, seed])")
    prompt, _, fields = parse_parameters(parameters)
    return prompt, _parse_seed(fields.get("Seed"), f"{image} (parameters text)", "pass a prompts CSV instead")


def _prompt_of(name: str, image_a: Path, image_b: Path, prompts: dict[str, tuple[str, int | None]] | None,
               prompts_csv: str | Path | None) -> tuple[str, int | None]:
    if prompts is not None:
        if name not in prompts:
            raise ValueError(f"{prompts_csv} has no row for {name!r}: add a row {name},<prompt>[,<seed>]")
        return prompts[name]
    prompt_a, prompt_b = _png_prompt(image_a), _png_prompt(image_b)
    if prompt_a != prompt_b:
        raise ValueError(f"{image_a} and {image_b} differ in prompt or seed: {prompt_a} vs {prompt_b}")
    return prompt_a


def pairs_from_folders(folder_a: str | Path, folder_b: str | Path, model_a: str | None = None,
                       model_b: str | None = None, prompts_csv: str | Path | None = None) -> list[PairSpec]:
    """One checked pair per file name found in both folders (which must hold the same names)."""
    folder_a, folder_b = Path(folder_a), Path(folder_b)
    images_a, images_b = _images_by_name(folder_a), _images_by_name(folder_b)
    if images_a.keys() != images_b.keys() or not images_a:
        only_a, only_b = sorted(images_a.keys() - images_b.keys()), sorted(images_b.keys() - images_a.keys())
        raise ValueError(f"{folder_a} and {folder_b} must hold images with the same names "
                         f"(only in the first: {only_a[:5]}, only in the second: {only_b[:5]}, "
                         f"{len(images_a)} and {len(images_b)} images)")
    prompts = _read_prompts_csv(Path(prompts_csv)) if prompts_csv else None
    model_a = folder_a.resolve().name if model_a is None else model_a
    model_b = folder_b.resolve().name if model_b is None else model_b
    specs = []
    for name in sorted(images_a):
        prompt, seed = _prompt_of(name, images_a[name], images_b[name], prompts, prompts_csv)
        specs.append(PairSpec(name, prompt, images_a[name], images_b[name], model_a, model_b, seed))
    for spec in specs:
        _check_spec(spec)
    return specs


def _dataset_image(root: Path, metadata: dict[str, Any], column: str, pair: int) -> Path:
    """One image of a dataset pair: its index entry resolved, inside the dataset's folder."""
    where = f"{root / 'index.parquet'} pair {pair}"
    relative = metadata.get(column)
    if not isinstance(relative, str) or not relative.strip():
        raise ValueError(f"{where}: {column} is empty: rebuild the dataset or drop that row")
    path = image_inside(root, relative, f"{where} {column}: {root / relative}", "the dataset folder", KEEP_INSIDE)
    return _readable_image(path, f"{where} {column}")


def pairs_from_dataset(dataset_dir: str | Path) -> list[PairSpec]:
    """The checked winner/loser pairs of a triplet dataset; model A is the AI feedback's winner."""
    from hgdpo.data.readers import open_preference_dataset

    dataset = open_preference_dataset(dataset_dir)
    if not len(dataset):
        raise ValueError(f"{dataset_dir} holds no pairs")
    if dataset.kind != "triplets":
        raise ValueError(f"{dataset_dir}: only triplet datasets (image files) can be studied, not {dataset.kind}")
    root = Path(dataset_dir).parent if Path(dataset_dir).is_file() else Path(dataset_dir)
    specs = []
    for index in range(len(dataset)):
        metadata = dataset.item_metadata(index)
        win, lose = (_dataset_image(root, metadata, column, index) for column in ("win_image", "lose_image"))
        specs.append(PairSpec(metadata["win_image"], dataset.prompt(index), win, lose, AI_WINNER, AI_LOSER))
    for spec in specs:
        _check_spec(spec)
    return specs
