"""The one exception type that reaches the user."""


class PuddingError(Exception):
    """A problem with what the user gave us (model, task, blocks, files) or with their set-up.

    The CLI prints it as a single line and exits non-zero; nothing else should be caught that way,
    so a real bug still shows its traceback.
    """
