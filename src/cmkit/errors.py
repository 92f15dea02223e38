"""User-facing errors: the CLI prints them as one line and exits with status 2."""


class CmkitError(Exception):
    """A problem with the user's input (paths, data, options, run directories)."""


def warn(message: str) -> None:
    """A warning for the user, one line on stderr (what the CLI prints errors beside)."""
    import sys
    print(f"cmkit: warning: {message}", file=sys.stderr)


class Stopped(Exception):
    """Training stopped by SIGTERM or SIGINT after saving a checkpoint at ``step``."""

    def __init__(self, signum: int, step: int):
        import signal
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.signum, self.step = signum, step
