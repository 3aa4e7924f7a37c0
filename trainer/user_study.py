#!/usr/bin/env python
"""Run a pairwise user study, "Which image looks more natural?" (paper Figure 3 and Figure 5a).

    python trainer/user_study.py create study.db --folders eval/hgdpo eval/sft          # model A vs model B
    python trainer/user_study.py create study.db --folders A B --names hgdpo sft --prompts prompts.csv
    python trainer/user_study.py create study.db --dataset my_triplets                  # humans vs AI feedback
    python trainer/user_study.py serve study.db --password secret                       # http://127.0.0.1:7860
    python trainer/user_study.py results study.db
    python trainer/user_study.py export study.db votes.csv

``create`` on an existing study adds the new pairs to it. The two folders hold images with the same file
names (``<folder>/<name>.png``, one per prompt and seed); prompts come from ``--prompts`` (CSV with columns
``name, prompt[, seed]``) or from each PNG's ``parameters`` text chunk. ``serve`` needs the ``app`` extra
(``pip install ".[app]"``).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hgdpo.errors import run_cli
from hgdpo.study import Study, format_results, pairs_from_dataset, pairs_from_folders

PASSWORD_ENV = "HGDPO_STUDY_PASSWORD"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Pairwise user study: create, serve, results, CSV export.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text,
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        sub.add_argument("study", help="The study's SQLite file.")
        return sub

    create = command("create", "Create a study (or add pairs to it) from two image folders or a triplet dataset.")
    source = create.add_mutually_exclusive_group(required=True)
    source.add_argument("--folders", nargs=2, metavar=("A", "B"),
                        help="Two folders of images with the same file names; the study reports A's win rate.")
    source.add_argument("--dataset", help="A triplet dataset: winner vs loser (how often raters agree with the AI).")
    create.add_argument("--names", nargs=2, metavar=("A", "B"), help="Model names (default: the folder names).")
    create.add_argument("--prompts", help="CSV with columns name, prompt[, seed] (default: the PNG text chunks).")
    create.add_argument("--seed", help="Seed of the per-rater order and sides (default: random; new studies only).")

    serve = command("serve", "Serve the voting page and the results.")
    serve.add_argument("--host", default="127.0.0.1", help="Address to bind (0.0.0.0: every interface).")
    serve.add_argument("--port", type=int, default=7860, help="Port.")
    serve.add_argument("--password", default=os.environ.get(PASSWORD_ENV),
                       help=f"Ask for this password (any user name), default ${PASSWORD_ENV}.")
    serve.add_argument("--hide-results", action="store_true", help="No Results tab (nor CSV link) for the raters.")

    command("results", "Print model A's win rate with its bootstrap interval per model pair (Markdown).")
    export = command("export", "Write every vote as CSV.")
    export.add_argument("output", help="CSV file to write.")
    return parser


def create(arguments: argparse.Namespace) -> str:
    if arguments.dataset:
        specs = pairs_from_dataset(arguments.dataset)
    else:
        names = arguments.names or (None, None)
        specs = pairs_from_folders(*arguments.folders, *names, prompts_csv=arguments.prompts)
    added = Study.create(arguments.study, seed=arguments.seed).add_pairs(specs)
    return f"{arguments.study}: {added} new pairs of {specs[0].model_a} vs {specs[0].model_b} ({len(specs)} given)"


def serve(arguments: argparse.Namespace) -> str:
    from hgdpo.study_app import serve as serve_study

    if not arguments.password and not _is_loopback(arguments.host):
        print(f"warning: serving on {arguments.host} without --password: anyone who can reach it can vote",
              file=sys.stderr)
    serve_study(arguments.study, arguments.host, arguments.port, arguments.password, not arguments.hide_results)
    return "Server stopped"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def results(arguments: argparse.Namespace) -> str:
    return format_results(Study(arguments.study).results())


def export(arguments: argparse.Namespace) -> str:
    count = Study(arguments.study).export_csv(arguments.output)
    return f"Wrote {count} votes to {arguments.output}"


COMMANDS: dict[str, Callable[[argparse.Namespace], str]] = {
    "create": create, "serve": serve, "results": results, "export": export}


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)

    def run() -> str:
        try:
            return COMMANDS[arguments.command](arguments)
        except ModuleNotFoundError as error:  # the optional gradio extra: shown as one line like other user errors
            raise ValueError(str(error)) from error

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
