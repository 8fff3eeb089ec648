"""Errors a user can act on: the CLI prints their message (no traceback) and exits 2."""


class UserError(Exception):
    """Bad input (a file, a value, a model) with a message that says what to fix and where."""


# Exit status of a run stopped by Ctrl-C (128 + SIGINT, as a shell reports it).
INTERRUPTED_EXIT = 130


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type's name when the message is empty),
    for a one-line report of a third-party error."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
