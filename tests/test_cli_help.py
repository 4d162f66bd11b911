"""Every option of every ``keyframe-worlds`` sub-command (and of Blender's ``-c keyframe_worlds``) says what it
does, and its default where it has one: a test walks the whole argparse tree."""

from __future__ import annotations

import argparse
import subprocess

import pytest

from conftest import VENV_BIN

from keyframe_worlds.addon.headless import build_parser as blender_parser
from keyframe_worlds.cli import DefaultsHelpFormatter, build_parser


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...]):
    """``(command path, parser, action)`` for every argument below ``parser``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, path + (name,))
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield path, parser, action


ARGUMENTS = list(walk(build_parser(), ("keyframe-worlds",))) + list(walk(blender_parser("blender -c keyframe_worlds"), ("blender",)))


def test_the_walk_sees_every_command():
    commands = {" ".join(path) for path, _parser, _action in ARGUMENTS}
    for expected in ("keyframe-worlds validate", "keyframe-worlds run", "keyframe-worlds serve", "keyframe-worlds scene generate",
                     "keyframe-worlds scene import", "keyframe-worlds trajectory convert", "blender generate"):
        assert expected in commands
    assert len(ARGUMENTS) > 60


@pytest.mark.parametrize("path,parser,action", ARGUMENTS,
                         ids=[f"{' '.join(p)} {a.option_strings[0] if a.option_strings else a.dest}" for p, _x, a in ARGUMENTS])
def test_every_option_has_help_and_its_default(path, parser, action):
    assert action.help and action.help != argparse.SUPPRESS and len(action.help) > 8, "no help text"
    assert parser.formatter_class is DefaultsHelpFormatter
    shown = DefaultsHelpFormatter(parser.prog)._expand_help(action)
    default = action.default
    worth_saying = not (default is None or default is False or default is argparse.SUPPRESS or default in ("", []))
    if action.option_strings and worth_saying:  # by identity: 0 is worth saying, a flag's False is not
        assert "default" in shown and (str(default) in shown or "default:" not in shown), shown


def test_help_prints_defaults_through_the_console_command():
    out = subprocess.run([str(VENV_BIN / "keyframe-worlds"), "scene", "generate", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    assert "random seed of the generator (default: 0)" in text and "(default: 16)" in text
