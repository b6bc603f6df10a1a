"""Errors bnfold raises for input it cannot use.

Each carries the offending path so the CLI can print one line, ``PATH: problem``,
and exit with code 2. Anything else escaping the library is a bug.
"""
from __future__ import annotations

import os
from typing import Optional, Union

PathLike = Union[str, "os.PathLike[str]"]


class BnfoldError(Exception):
    """A problem with the user's input or environment, not a bug in bnfold."""

    exit_code = 2

    def __init__(self, message: str, path: Optional[PathLike] = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = None if path is None else os.fspath(path)

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class SourceChangedError(BnfoldError):
    """An input file is no longer the one bnfold loaded: replaced, rewritten or removed while
    bnfold worked on it (see ``modelio.tensors.file_identity``). ``nothing_written`` adds that no
    output was written, for the commands that write one."""

    def __init__(self, path: PathLike, nothing_written: bool = False) -> None:
        super().__init__("changed while bnfold read it (replaced, rewritten or removed)"
                         + ("; nothing was written" if nothing_written else ""), path)


class MissingDependencyError(BnfoldError):
    """An optional dependency (ONNX Runtime) is needed but not installed."""


class MalformedModelError(ValueError):
    """Model content bnfold cannot analyse: tensor data that does not match its dims or type,
    a Constant node of an unsupported form. The fold driver turns it into a kept BN's reason;
    a write that meets it refuses the input (exit 2). Any other exception is a bug."""
