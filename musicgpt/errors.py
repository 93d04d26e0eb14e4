"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class MusicGPTError(Exception):
    """An error whose message is a complete, one-line explanation for the user."""


class MidiReadError(MusicGPTError):
    """A MIDI file could not be read or holds nothing usable; the message names the file."""


class CheckpointError(MusicGPTError):
    """A checkpoint is missing, truncated, tampered with or incompatible."""


class Interrupted(BaseException):
    """A job stopped by SIGINT or SIGTERM; the command line exits with 128 + the signal number.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` swallows it."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
