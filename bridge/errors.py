"""The project's one error type, and the validation error that carries every problem.

The format layer raises these with plain messages; operators and the command
line turn them into a report or an exit status. Nothing else should escape to
a user as a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass

#: How every error line a user sees starts: the console command and Blender's ``-c keyframe_worlds`` alike.
ERROR_PREFIX = "keyframe-worlds: error:"


class KeyframeWorldsError(Exception):
    """A problem a user can act on: the message names what is wrong."""


@dataclass(frozen=True)
class Problem:
    """One validation problem: ``path`` is the field path (``trajectories[0].frames[3].c2w_opencv``)."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" if self.path else self.reason

    def to_json(self) -> dict:
        return {"path": self.path, "reason": self.reason}


class ValidationError(KeyframeWorldsError):
    """Raised when a document has problems; ``problems`` lists every one of them."""

    def __init__(self, what: str, problems: list[Problem]):
        self.what = what
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{what} is invalid ({len(self.problems)} problem(s)):\n{lines}")
