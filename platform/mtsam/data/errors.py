"""The one error type raised for bad dataset input."""

from __future__ import annotations


class DatasetError(ValueError):
    """Bad or missing dataset input.

    The message is one line that names the offending file or folder and says what was expected,
    so a job can print it as-is and exit.
    """
