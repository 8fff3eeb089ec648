"""Errors a user can act on: the CLI prints their message (no traceback) and exits 2."""


class UserError(Exception):
    """Bad input (a file, a value, a model) with a message that says what to fix and where."""


# Exit status of a run stopped by Ctrl-C (128 + SIGINT, as a shell reports it).
INTERRUPTED_EXIT = 130
