"""Model files in and out. One module per concern:

==================  ==========================================================================
``load``            read a file, refuse what is not a usable ONNX model (naming the file)
``tensors``         tensor data wherever it lives: inline, or memory-mapped from external data
``pending``         :data:`~bnfold.modelio.pending.PendingValue`: a tensor waiting to be written
``external``        external data: locations checked at load, ``.data`` files written piece by piece
``stream``          streaming protobuf serialization (no second copy of the weights)
``write``           atomic staging and commit, file modes
==================  ==========================================================================

The names below are re-exported for convenience and imported on first use, so that
importing one concern (the graph index reads tensors) does not load the others (the writer).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Dict

if TYPE_CHECKING:  # the names as mypy sees them (``x as x``: re-exported)
    from .load import load_model as load_model
    from .load import load_model_info as load_model_info
    from .pending import PendingValue as PendingValue
    from .pending import ScaledTensor as ScaledTensor
    from .pending import as_array as as_array
    from .stream import serialize as serialize
    from .stream import write_model as write_model
    from .tensors import external_files as external_files
    from .tensors import iter_tensors as iter_tensors
    from .tensors import read_tensor as read_tensor
    from .tensors import set_tensor_data as set_tensor_data
    from .tensors import tensor_nbytes as tensor_nbytes
    from .tensors import uses_external_data as uses_external_data
    from .write import StagedModel as StagedModel
    from .write import save_model as save_model
    from .write import stage_model as stage_model
    from .write import write_bytes_atomic as write_bytes_atomic

_EXPORTS: Dict[str, str] = {
    "load_model": "load", "load_model_info": "load",
    "PendingValue": "pending", "ScaledTensor": "pending", "as_array": "pending",
    "serialize": "stream", "write_model": "stream",
    "external_files": "tensors", "iter_tensors": "tensors", "read_tensor": "tensors",
    "set_tensor_data": "tensors", "tensor_nbytes": "tensors", "uses_external_data": "tensors",
    "StagedModel": "write", "save_model": "write", "stage_model": "write", "write_bytes_atomic": "write",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bnfold.modelio' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
