"""The one exception type pylomin raises for corrupt, mismatched or unreadable checkpoints."""


class PylominError(RuntimeError):
    """A checkpoint, converted folder or model does not match what pylomin expects.

    The message names the file, tensor or module and says what to do.
    """
