"""The trainer's user-facing error: the command prints it on one line and exits with status 2."""


class TrainError(Exception):
    """A clear, user-facing error (a bad flag, model, checkpoint or output directory)."""
