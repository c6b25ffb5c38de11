"""The `hybrids` command line.

    hybrids blocks                     list the registered blocks and their config fields
    hybrids layout "6M:A*" --depth 78  resolve a layout string and print it
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import blocks
from hybrids.layout import LayoutError, parse_layout


def _blocks(args) -> int:
    for entry in blocks.entries():
        names = [f.name for f in dataclasses.fields(entry.config_cls)]
        print(f"{entry.symbol:<3} {entry.name:<17} {entry.kind:<7} {entry.cls.__module__}.{entry.cls.__name__}")
        print(f"    config: {', '.join(names)}")
    return 0


def _layout(args) -> int:
    layout = parse_layout(args.text, depth=args.depth)
    print(f"layout: {layout}")
    print(f"backbone layers: {layout.n_layers}, shared invocations: {len(layout.invocations)}")
    print(layout.describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybrids", description="Hybrid SSM / attention model experiments.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("blocks", help="list the registered blocks").set_defaults(run=_blocks)
    lay = sub.add_parser("layout", help="resolve and print a layout string")
    lay.add_argument("text", help='a layout such as "6M:A*"')
    lay.add_argument("--depth", type=int, default=None, help="tile the layout to this many backbone layers")
    lay.set_defaults(run=_layout)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script: errors a user can cause end in one line and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (LayoutError, blocks.ConfigError, blocks.RegistryError) as err:
        print(f"hybrids: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
