"""The `pudding` command. Importing the CLI takes a moment before `cli.main` can catch a Ctrl-C; one pressed then
ends the same way as one pressed later ("error: interrupted", exit 130), not in Python's traceback."""

from __future__ import annotations

from .errors import fail


def main() -> None:
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        fail("interrupted", 130)
    cli_main()
