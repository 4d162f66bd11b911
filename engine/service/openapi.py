"""The service's OpenAPI document, kept in the repository as ``engine/service/openapi.json``.

    python -m keyframe_worlds.engine.service.openapi          # rewrite the file
    python -m keyframe_worlds.engine.service.openapi --check  # exit 1 if it is out of date

A test runs the check, so the file follows every change of the routes.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

OPENAPI_PATH = Path(__file__).with_name("openapi.json")


def openapi_document() -> dict:
    from .app import AppSettings, create_app
    from .jobs import JobManager

    with tempfile.TemporaryDirectory() as root:
        manager = JobManager(root, devices=["cpu"])
        return create_app(manager, AppSettings(token="x" * 32)).openapi()


def render() -> str:
    return json.dumps(openapi_document(), indent=1, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if "--check" in argv:
        current = OPENAPI_PATH.read_text(encoding="utf-8") if OPENAPI_PATH.exists() else ""
        if current != text:
            print(f"{OPENAPI_PATH} is out of date: run python -m keyframe_worlds.engine.service.openapi", file=sys.stderr)
            return 1
        return 0
    OPENAPI_PATH.write_text(text, encoding="utf-8")
    print(f"wrote {OPENAPI_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
