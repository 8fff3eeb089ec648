"""Errors a user can act on: the CLI prints their message (no traceback) and exits 2."""


class UserError(Exception):
    """Bad input (a file, a value, a model) with a message that says what to fix and where."""
