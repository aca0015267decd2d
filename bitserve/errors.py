"""Typed errors: every failure a user can cause ends in one of these, with a one-line message."""


class BitserveError(Exception):
    """Base of all errors the CLI reports as a one-line message (exit code 2)."""


class UsageError(BitserveError):
    """Bad arguments or input files."""


class CheckpointError(BitserveError):
    """A checkpoint directory that cannot be loaded; the message names the file and problem."""


class NotACheckpointError(CheckpointError):
    pass


class UnsupportedFormatError(CheckpointError):
    pass


class ChecksumError(CheckpointError):
    pass


class CorruptFileError(CheckpointError):
    pass


class MissingTensorError(CheckpointError):
    pass


class ShapeMismatchError(CheckpointError):
    pass


class QualityGateError(BitserveError):
    """The quantized model lost more quality than the user allowed."""
