"""The `dreamdeck` command.

Each subcommand lives in its own module of this package and defines
``add_parser(subparsers)``, which adds its parser and sets ``func`` (taking the parsed
args, returning an exit code). Modules are discovered, so adding a command is adding a
file. Heavy imports (torch, av, ...) stay inside the handlers so `dreamdeck --help` is quick.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
import time

T_START = time.perf_counter()  # the launch, for `run`'s start-up phases


class UsageError(Exception):
    """A bad flag or argument: printed as one clear line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dreamdeck", description="Live real-time video diffusion for VJs."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        add = getattr(module, "add_parser", None)
        if add is not None:
            add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"dreamdeck {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
