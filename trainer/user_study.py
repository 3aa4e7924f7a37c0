#!/usr/bin/env python
"""Run a pairwise user study, "Which image looks more natural?" (paper Figure 3 and Figure 5a).

    python trainer/user_study.py create study.db --folders eval/hgdpo eval/sft          # model A vs model B
    python trainer/user_study.py create study.db --folders A B --names hgdpo sft --prompts prompts.csv
    python trainer/user_study.py create study.db --dataset my_triplets                  # humans vs AI feedback
    python trainer/user_study.py raters add study.db anna ben --url http://host:7860    # personal links
    HGDPO_STUDY_PASSWORD=secret python trainer/user_study.py serve study.db             # http://127.0.0.1:7860
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
from hgdpo.study.store import Study, check_rater, format_results, pairs_from_dataset, pairs_from_folders
from hgdpo.study.app import DEFAULT_MAX_RATERS, Access
from hgdpo.study.app import serve as serve_study

PASSWORD_ENV = "HGDPO_STUDY_PASSWORD"
ORGANISER_ENV = "HGDPO_STUDY_ORGANISER_PASSWORD"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Pairwise user study: create, raters, serve, results, CSV export.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str, parent: argparse._SubParsersAction = commands) -> argparse.ArgumentParser:
        sub = parent.add_parser(name, help=help_text, description=help_text,
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

    raters = commands.add_parser("raters", help="Add raters with a personal link and password, or list the raters.")
    raters_commands = raters.add_subparsers(dest="raters_command", required=True)
    add = command("add", "Give each rater a personal link and password (printed once; only a hash is stored).",
                  raters_commands)
    add.add_argument("names", nargs="+", help="Rater ids (their login names).")
    add.add_argument("--url", default="http://127.0.0.1:7860", help="The server's address as the raters reach it.")
    add.add_argument("--replace-key", action="store_true",
                     help="Give raters who hold a key a new one (their old link and password stop working).")
    command("list", "List the raters: when they joined, their votes, whether they hold a key.", raters_commands)

    serve = command("serve", "Serve the voting page (and, with an organiser password, the results).")
    serve.add_argument("--host", default="127.0.0.1",
                       help="Address to bind (0.0.0.0: every interface; needs a password or raters with keys).")
    serve.add_argument("--port", type=int, default=7860, help="Port (1-65535).")
    serve.add_argument("--password", help=f"The raters' shared password (any name); default ${PASSWORD_ENV}, "
                                          "which is better: a command line is visible to the machine's users.")
    serve.add_argument("--organiser-password", help=f"Serve the results and CSV at /study/results to whoever gives "
                                                    f"it; default ${ORGANISER_ENV}. Without it raters never see them.")
    serve.add_argument("--max-raters", type=int, default=DEFAULT_MAX_RATERS,
                       help="The most raters the study admits (raters added with keys count too).")
    serve.add_argument("--open-enrolment", action="store_true", help="Admit any number of new rater ids.")
    serve.add_argument("--insecure-no-password", action="store_true",
                       help="Allow a non-loopback --host with no password and no rater keys (anyone who reaches "
                            "the page can vote under any name).")

    command("results", "Print model A's win rate with its bootstrap interval per model pair (Markdown).")
    export = command("export", "Write every vote as CSV.")
    export.add_argument("output", help="The .csv file to write (never the study itself).")
    export.add_argument("--force", action="store_true", help="Replace an existing CSV file.")
    return parser


def create(arguments: argparse.Namespace) -> str:
    if arguments.dataset:
        specs = pairs_from_dataset(arguments.dataset)
    else:
        names = arguments.names or (None, None)
        specs = pairs_from_folders(*arguments.folders, *names, prompts_csv=arguments.prompts)
    added = Study.create(arguments.study, seed=arguments.seed).add_pairs(specs)
    return f"{arguments.study}: {added} new pairs of {specs[0].model_a} vs {specs[0].model_b} ({len(specs)} given)"


def add_raters(arguments: argparse.Namespace) -> str:
    """Issue keys only once every name is checked: a refused name leaves the study as it was."""
    url = arguments.url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--url {arguments.url!r} is not an http(s) address: give e.g. http://host:7860")
    names = [check_rater(name) for name in arguments.names]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"Rater {repeated[0]!r} is given twice: name each rater once")
    study = Study(arguments.study)
    holders = [name for name in names if study.has_key(name)]
    if holders and not arguments.replace_key:
        raise ValueError(f"Rater {holders[0]!r} holds a key already: pass --replace-key to give them a new one "
                         "(their old link stops working)")
    lines = []
    for name in names:
        key = study.issue_key(name, replace=arguments.replace_key)
        lines.append(f"{name}\t{url}/study/enter?key={key}\t(or log in as {name} with password {key})")
    return "\n".join(lines)


def list_raters(arguments: argparse.Namespace) -> str:
    rows = [f"{info.rater}\t{info.first_seen}\t{info.votes} votes\t{'key' if info.has_key else 'no key'}"
            for info in Study(arguments.study).raters()]
    return "\n".join(rows) or "No raters yet"


def serve_access(arguments: argparse.Namespace) -> Access:
    """The checked login options (before anything is loaded)."""
    if not 1 <= arguments.port <= 65535:
        raise ValueError(f"--port {arguments.port} is out of range: use 1-65535")
    if arguments.max_raters < 1:
        raise ValueError(f"--max-raters {arguments.max_raters} must be at least 1 (or pass --open-enrolment)")
    password = _secret(arguments.password, PASSWORD_ENV, "--password")
    organiser = _secret(arguments.organiser_password, ORGANISER_ENV, "--organiser-password")
    if organiser is not None and organiser == password:
        raise ValueError("The organiser password is the raters' password: choose another one, or raters see results")
    return Access(password, organiser, None if arguments.open_enrolment else arguments.max_raters)


def _secret(given: str | None, variable: str, option: str) -> str | None:
    """An option's value, else the environment variable's (empty: unset); an empty option is refused."""
    if given == "":
        raise ValueError(f"{option} is empty: give a password or leave the option out")
    return given if given is not None else os.environ.get(variable) or None


def serve(arguments: argparse.Namespace) -> str:
    access = serve_access(arguments)
    study = Study(arguments.study)
    if not (access.password or study.has_key() or _is_loopback(arguments.host) or arguments.insecure_no_password):
        raise ValueError(f"--host {arguments.host} with no password: set ${PASSWORD_ENV}, add raters with "
                         "personal links (raters add), or pass --insecure-no-password")
    serve_study(study.path, arguments.host, arguments.port, access)
    return "Server stopped"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def results(arguments: argparse.Namespace) -> str:
    return format_results(Study(arguments.study).results())


def export(arguments: argparse.Namespace) -> str:
    count = Study(arguments.study).export_csv(arguments.output, overwrite=arguments.force)
    return f"Wrote {count} votes to {arguments.output}"


def raters(arguments: argparse.Namespace) -> str:
    return {"add": add_raters, "list": list_raters}[arguments.raters_command](arguments)


COMMANDS: dict[str, Callable[[argparse.Namespace], str]] = {
    "create": create, "raters": raters, "serve": serve, "results": results, "export": export}


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
