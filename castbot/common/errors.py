"""The error the flow raises for bad input: its message names the file and the problem."""


class DataError(ValueError):
    """Input data that castbot refuses; nothing is trained or registered after it."""
