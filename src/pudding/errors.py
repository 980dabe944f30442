"""The one exception type that reaches the user, and how the command line reports it."""

import sys


class PuddingError(Exception):
    """A problem with what the user gave us (model, task, blocks, files) or with their set-up.

    The CLI prints it as a single line and exits non-zero; nothing else should be caught that way,
    so a real bug still shows its traceback.
    """


def fail(message: str, code: int = 2):
    """End the command with `message` as one line on stderr (whatever line breaks it held) and exit `code`."""
    message = " ".join(str(message).split())
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)
