"""``longact``: the command-line front door. Each sub-command lives in its own module.

A sub-command module exposes ``register(subparsers)`` which adds its parser and sets
``func`` (called with the parsed args; returns an exit code). Errors meant for the
user are raised as ``UsageError`` and printed without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# module name under longact.cli -> registers one or more sub-commands
COMMAND_MODULES = ["tiny_model", "doctor", "data", "warmup", "eval", "ablate", "submit", "inspect"]


class UsageError(Exception):
    """Bad input from the user: printed as one clear line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longact",
        description="LongAct: saliency-guided sparse Q/K updates for long-context RL on verl.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"longact.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from longact.train.console import quiet_known_noise

    quiet_known_noise()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"longact {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
