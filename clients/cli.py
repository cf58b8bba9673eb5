"""The `omni2` console command: one entry point, one subcommand per module.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `main(args) -> int`;
modules are imported only when their subcommand runs, so `omni2 chat` never pays for torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("omni2.server.serve", "run the realtime voice+vision server"),
    "chat": ("omni2.clients.chat", "talk to a running server from the terminal"),
    "loadtest": ("omni2.clients.loadtest", "open many concurrent sessions against a server"),
    "make-tiny": ("omni2.clients.tools.make_tiny", "write the synthetic tiny checkpoint (released layout)"),
    "generate": ("omni2.clients.tools.generate", "offline reference generation; prints token ids as JSON"),
    "bench": ("omni2.clients.tools.bench", "benchmarks: model, kernels, engine, arrivals, server, interrupt, soak"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """All subcommands are listed; only `only` (the one being run) has its module imported."""
    parser = argparse.ArgumentParser(prog="omni2", description="Mini-Omni2 realtime voice+vision server")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name != only:
            continue
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            p.set_defaults(_missing=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(only=argv[0] if argv else None)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    if getattr(args, "_missing", False):
        print(f"omni2 {args.command}: not available in this build", file=sys.stderr)
        return 2
    return int(importlib.import_module(args._module).main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
