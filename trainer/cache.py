#!/usr/bin/env python
"""Report the size of the latent caches, or delete the ones not used for a while.

    python trainer/cache.py report
    python trainer/cache.py prune --older-than 30          # caches unused for 30 days
    python trainer/cache.py prune --older-than 30 --dry-run

Only encoded-dataset folders that hgdpo wrote under ``<cache dir>/encoded`` are listed or deleted;
nothing else in the cache folder (or outside it) is touched.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hgdpo.errors import run_cli  # noqa: E402
from hgdpo.fileio import cache_root  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Size report and pruning of hgdpo's latent caches.")
    parser.add_argument("--cache-dir", default=None,
                        help="Cache folder (default: $HGDPO_CACHE or ~/.cache/hgdpo), as given to train.py.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("report", help="List the caches with size and last use.")
    prune = commands.add_parser("prune", help="Delete caches not used for --older-than days.")
    prune.add_argument("--older-than", type=float, required=True, metavar="DAYS", help="Age in days (>= 0).")
    prune.add_argument("--dry-run", action="store_true", help="Only list what would be deleted.")
    return parser


def _line(entry) -> str:
    age = (time.time() - entry.last_used) / 86400
    return f"{entry.size_bytes / 2**20:10.1f} MiB  {age:7.1f} days  {entry.path}"


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    root = Path(arguments.cache_dir).expanduser() if arguments.cache_dir else cache_root()

    def run() -> str:
        from hgdpo.training.latent_cache import cache_entries, prune_cache

        if arguments.cache_dir and not root.is_dir():
            raise FileNotFoundError(f"--cache-dir {root} is not a folder; give the folder train.py used.")
        if arguments.command == "report":
            entries = cache_entries(root)
            lines = [_line(entry) for entry in entries]
            total = sum(entry.size_bytes for entry in entries) / 2**20
            return "\n".join(lines + [f"{len(entries)} cache(s), {total:.1f} MiB in {root}"])
        removed = prune_cache(root, arguments.older_than, dry_run=arguments.dry_run)
        verb = "would delete" if arguments.dry_run else "deleted"
        freed = sum(entry.size_bytes for entry in removed) / 2**20
        return "\n".join([_line(entry) for entry in removed] + [f"{verb} {len(removed)} cache(s), {freed:.1f} MiB"])

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
