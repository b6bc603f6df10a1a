"""bnfold: fold, insert and verify BatchNormalization layers in ONNX models.

The public API is imported lazily so that ``bnfold --help`` does not pay for
importing onnx or ONNX Runtime.
"""
from __future__ import annotations

__version__ = "0.1.0"

_EXPORTS = {
    "fuse": "bnfold.fold",
    "FuseResult": "bnfold.fold",
    "BNRecord": "bnfold.fold",
    "ModelStats": "bnfold.fold",
    "Reason": "bnfold.reasons",
    "BnfoldError": "bnfold.errors",
    "load_model": "bnfold.modelio",
    "save_model": "bnfold.modelio",
    "verify": "bnfold.verification",
    "VerifyReport": "bnfold.verification",
    "fuse_file": "bnfold.workflow",
    "check_file": "bnfold.workflow",
    "run_batch": "bnfold.workflow",
    "FuseOutcome": "bnfold.workflow",
    "FuseOptions": "bnfold.workflow",
    "Report": "bnfold.workflow",
    "Status": "bnfold.workflow",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bnfold' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
