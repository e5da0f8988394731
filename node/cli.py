"""The ``byteswarm`` command: a thin dispatcher over subcommands.

Subcommands register themselves through the ``byteswarm.commands`` entry-point group
(see pyproject.toml), so this module never imports ``sim/``: the two drivers stay apart.
A subcommand module exposes ``register(subparsers) -> None``; the parser it adds must set
``func`` (called with the parsed namespace, returning an exit code).

Errors a user can fix (a bad flag, a bad config value, a missing file) print one line and
exit with status 2; anything else is our bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

from byteswarm.optim.config import ConfigError


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that points at --help."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="byteswarm",
        description="Train neural networks across peers on ordinary internet links: "
        "seeded SPSA (one byte per peer per step), NoLoCo and DiLoCo, over a DHT, "
        "plus a simulator of many peers on one machine.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for ep in sorted(entry_points(group="byteswarm.commands"), key=lambda e: e.name):
        ep.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"byteswarm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"byteswarm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
