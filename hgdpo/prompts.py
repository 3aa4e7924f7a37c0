"""Reading prompt lists for the dataset builder.

Supported files (chosen by suffix):

* ``.txt`` (or any other suffix): one prompt per line;
* ``.tsv`` / ``.csv``: a table with a header row; the prompt column is ``column``, else ``Prompt``
  when present, else the first column. ``category`` keeps only rows whose ``Category`` column equals
  it (e.g. ``People`` in PartiPrompts.tsv: the paper's 177 test prompts);
* ``.jsonl``: one JSON object per line with a ``"prompt"`` key (or ``column``).

Prompts are stripped of surrounding whitespace; empty prompts and exact duplicates (after
stripping; the first occurrence is kept) are dropped and counted.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PromptList", "read_prompts"]

CATEGORY_COLUMN = "Category"


@dataclass
class PromptList:
    """The prompts of a file, in file order, with what was dropped."""

    prompts: list[str] = field(default_factory=list)
    dropped_empty: int = 0
    dropped_duplicates: int = 0
    source: str = ""

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self):
        return iter(self.prompts)

    def __getitem__(self, i: int) -> str:
        return self.prompts[i]


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path}: not valid UTF-8 (byte 0x{data[error.start]:02x} at byte offset {error.start}); "
            "re-save it as UTF-8"
        ) from None
    return text.removeprefix("\ufeff")  # a byte-order mark written by some editors


def _table_prompts(path: Path, text: str, column: str | None, category: str | None) -> list[str]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    columns = [name for name in (reader.fieldnames or []) if name is not None]
    if not columns:
        raise ValueError(f"{path}: empty table (no header row)")
    if column is None:
        column = "Prompt" if "Prompt" in columns else columns[0]
    if column not in columns:
        raise ValueError(f"{path}: no column {column!r}; the columns are {columns}")
    if category is not None and CATEGORY_COLUMN not in columns:
        raise ValueError(
            f"{path}: cannot select category {category!r}: no {CATEGORY_COLUMN!r} column; the columns are {columns}"
        )
    prompts = []
    for row in reader:
        if category is not None and (row.get(CATEGORY_COLUMN) or "").strip() != category:
            continue
        prompts.append(row.get(column) or "")
    return prompts


def _jsonl_prompts(path: Path, text: str, column: str | None) -> list[str]:
    key = column or "prompt"
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as error:
            raise ValueError(f"{path}, line {number}: not valid JSON ({error})") from None
        if not isinstance(item, dict) or key not in item:
            found = sorted(item) if isinstance(item, dict) else type(item).__name__
            raise ValueError(f"{path}, line {number}: expected an object with a {key!r} key, found {found}")
        value = item[key]
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{path}, line {number}: {key!r} must be a string, got {type(value).__name__}")
        prompts.append(value or "")
    return prompts


def read_prompts(path: str | Path, column: str | None = None, category: str | None = None) -> PromptList:
    """Read the prompts of a .txt, .tsv, .csv or .jsonl file (see the module docstring).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not UTF-8, a named column is missing (the message lists the
            columns), a JSON line is malformed, or ``category`` is used without a Category column.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    text = _read_text(path)
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".csv"):
        raw = _table_prompts(path, text, column, category)
    elif suffix == ".jsonl":
        if category is not None:
            raise ValueError(f"{path}: --category needs a .tsv/.csv file with a {CATEGORY_COLUMN!r} column")
        raw = _jsonl_prompts(path, text, column)
    else:
        if column is not None or category is not None:
            raise ValueError(f"{path}: a column or category can only be chosen in a .tsv/.csv/.jsonl file")
        raw = text.splitlines()
    result = PromptList(source=str(path))
    seen: set[str] = set()
    for prompt in raw:
        prompt = prompt.strip()
        if not prompt:
            result.dropped_empty += 1
        elif prompt in seen:
            result.dropped_duplicates += 1
        else:
            seen.add(prompt)
            result.prompts.append(prompt)
    return result
