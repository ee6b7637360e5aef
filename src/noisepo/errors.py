"""Errors a user can fix. The CLI turns them into one clear line and exit status 2.

Anything else that escapes is a bug and keeps its traceback.
"""
from __future__ import annotations


class NoisepoError(Exception):
    """Base class of the errors that are the user's to fix (bad input, bad config)."""

    exit_code = 2


class InputError(NoisepoError):
    """Bad input data: names the file, the line (1-based) and the field when known.

    >>> str(InputError("is empty", path="d.jsonl", line=3, field="chosen"))
    "d.jsonl:3: field 'chosen': is empty"
    """

    def __init__(self, message: str, *, path=None, line: int | None = None, field: str | None = None):
        self.message = message
        self.path = None if path is None else str(path)
        self.line = line
        self.field = field
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.path is not None:
            where = self.path + (f":{self.line}" if self.line is not None else "") + ": "
        elif self.line is not None:
            where = f"line {self.line}: "
        what = f"field '{self.field}': " if self.field is not None else ""
        return f"{where}{what}{self.message}"


class ConfigError(NoisepoError):
    """Bad configuration: an unknown key, a wrong type, a value out of range. Names the key."""

    def __init__(self, message: str, *, key: str | None = None, path=None):
        self.message = message
        self.key = key
        self.path = None if path is None else str(path)
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        what = f"'{self.key}': " if self.key else ""
        return f"{where}{what}{self.message}"
