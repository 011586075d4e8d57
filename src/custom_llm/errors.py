"""Errors that are the user's to fix (bad input), as opposed to bugs.

The command line turns a :class:`UserError` into one ``error: ...`` line on stderr and exit code 2;
anything else that escapes is a crash and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: a missing file, an invalid config value, a malformed request."""


class ConfigError(UserError, ValueError):
    """An invalid configuration; the message lists every problem found, each naming its field."""
