"""The one error type users see: a single line, exit code 2, no traceback."""


class ConvertError(Exception):
    """Bad input or an impossible request; the message names the file, tensor or key."""
