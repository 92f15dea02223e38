"""User-facing errors: the CLI prints them as one line and exits with status 2."""


class CmkitError(Exception):
    """A problem with the user's input (paths, data, options, run directories)."""
