"""The ``keyframe-worlds`` console command.

Each area of the project owns its subcommands in a ``commands`` module with an
``add_commands(subparsers)`` function; this file only gathers them. Those
modules import heavy dependencies (torch, bpy) inside their handlers, so
``keyframe-worlds validate`` stays fast and works without the engine's
dependencies.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap

from . import __version__
from .bridge.errors import ERROR_PREFIX, KeyframeWorldsError

# Modules (relative to this package) that contribute subcommands, in help order.
COMMAND_MODULES = (
    ".engine.run.commands",
    ".bridge.commands",
    ".bridge.farm",
    ".engine.models.commands",
    ".engine.service.commands",
    ".addon.headless",
)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, where it has one worth saying (not None, False or empty) and the
    help does not already name it. Names are never broken at their hyphens (``worldstereo-memory-dmd`` and
    repository ids stay whole, so they can be copied from the help)."""

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False, break_long_words=False)

    def _fill_text(self, text, width, indent):
        return textwrap.fill(" ".join(text.split()), width, initial_indent=indent, subsequent_indent=indent,
                             break_on_hyphens=False, break_long_words=False)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        # By identity: 0 is a default worth saying, False (a flag's) is not.
        if (default is None or default is False or default is argparse.SUPPRESS or default in ("", []) or "default" in text
                or not action.option_strings or isinstance(action, argparse._StoreConstAction)):
            return text
        return f"{text} (default: %(default)s)"


def show_defaults(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give ``parser`` and every sub-command's parser below it :class:`DefaultsHelpFormatter`; returns ``parser``."""
    parser.formatter_class = DefaultsHelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                show_defaults(sub)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keyframe-worlds",
        description="Generate worlds along keyframed cameras (WorldStereo engine, bridge tools).",
    )
    parser.add_argument("--version", action="version", version=f"keyframe-worlds {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name, __package__)
        except ModuleNotFoundError as exc:
            # An area that has not been written yet contributes nothing; a missing
            # third-party dependency inside an existing module is a real error.
            if exc.name and exc.name.startswith(__package__ + "."):
                continue
            raise
        module.add_commands(subparsers)
    return show_defaults(parser)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyframeWorldsError as exc:
        print(f"{ERROR_PREFIX} {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file or folder the command could not read or write: one line, not a traceback
        from .bridge.paths import describe_os_error

        print(f"{ERROR_PREFIX} {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("keyframe-worlds: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
