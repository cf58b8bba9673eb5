"""README.md's command table names every `omni2` subcommand and every benchmark the CLI has."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from omni2.clients.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_the_readme_command_table_lists_every_subcommand_and_benchmark():
    text = README.read_text()
    table = text.split("## Command line", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `omni2 ")]
    named = {re.match(r"\| `omni2 ([a-z-]+)", row).group(1) for row in rows}
    assert named == set(_subcommands(build_parser()))
    bench_row = next(row for row in rows if row.startswith("| `omni2 bench "))
    listed = set(re.match(r"\| `omni2 bench ([a-z|\\]+)`", bench_row).group(1).replace("\\", "").split("|"))
    assert listed == set(_subcommands(_subcommands(build_parser(only="bench"))["bench"]))


def test_every_help_text_prints():
    """`omni2 X --help` and `omni2 bench X --help` for every X (argparse expands '%' in help
    texts: a bare one made `omni2 bench arrivals --help` raise)."""
    for name in _subcommands(build_parser()):
        full = _subcommands(build_parser(only=name))[name]
        assert full.format_help()
        if name == "bench":
            for what, bench in _subcommands(full).items():
                assert f"omni2 bench {what}" in bench.format_help()
