"""Errors a user can cause, reported as one clear message."""


class UserError(Exception):
    """Bad config, bad data, a missing key or file: something the user can fix.

    The message names the file, key or line. Entry scripts turn it into one log line and a non-zero exit.
    """
