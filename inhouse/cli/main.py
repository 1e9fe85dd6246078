"""``inhouse`` command: parses arguments and dispatches to a subcommand."""

from __future__ import annotations

import argparse

from inhouse.cli import adapters, audit, bench, doctor, keys, models, serve

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="inhouse", description="Your own models behind an OpenAI-compatible API.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve.add_parser(commands)
    keys.add_parser(commands)
    audit.add_parser(commands)
    models.add_parser(commands)
    models.add_reload_parser(commands)
    adapters.add_parser(commands)
    doctor.add_parser(commands)
    bench.add_parser(commands)
    args = parser.parse_args(argv)
    return int(args.run(args))
