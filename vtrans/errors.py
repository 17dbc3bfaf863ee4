"""Errors a user can fix. The CLI prints them as one line and exits with code 2 (a traceback only with --debug)."""


class UsageError(Exception):
    """A bad input: the message names the input and says what to do."""
