"""``python -m data_tools prepare ...``"""
from __future__ import annotations

import argparse
import sys

from data_tools import prepare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    prepare.add_arguments(commands.add_parser("prepare", help=prepare.SUMMARY, description=prepare.__doc__,
                                              formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    return prepare.run(args)


if __name__ == "__main__":
    sys.exit(main())
