"""Errors shared by every layer (the CLI prints them as one line, exit code 2)."""


class UserError(Exception):
    """A problem with the user's input: printed without a traceback, exit code 2."""
