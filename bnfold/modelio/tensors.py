"""Tensor data wherever it lives: inline in the protobuf or in external data files.

Every place that reads or replaces a weight's values goes through here, so the rules
(sizes checked against dims, external tensors memory-mapped, not read whole) hold once.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path
from typing import Dict, Iterator, Optional, Set

import numpy as np
import onnx
from onnx import FunctionProto, GraphProto, ModelProto, NodeProto, TensorProto, numpy_helper

from ..errors import MalformedModelError, PathLike, SourceChangedError

# Sub-byte and string types: their raw_data length does not follow from dims x itemsize.
PACKED_TYPES = {TensorProto.STRING} | {getattr(TensorProto, n) for n in
                                       ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2") if hasattr(TensorProto, n)}
# The typed value fields of a TensorProto, besides raw_data and string_data.
VALUE_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")
# external_data key of a weight left in the model file itself when it was loaded (see
# load.load_source's leave_weights): its value identifies the file as it was then.
IN_MODEL_FILE = "bnfold:in-model-file"


def iter_tensors(model: ModelProto) -> Iterator[TensorProto]:
    """Every TensorProto that can hold weights: initializers and tensor attributes, all scopes."""

    def graph_tensors(graph: GraphProto) -> Iterator[TensorProto]:
        yield from graph.initializer
        for sp in graph.sparse_initializer:
            yield sp.values
            yield sp.indices
        for node in graph.node:
            yield from node_tensors(node)

    def node_tensors(node: NodeProto) -> Iterator[TensorProto]:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from graph_tensors(a.g)
            for g in a.graphs:
                yield from graph_tensors(g)

    yield from graph_tensors(model.graph)
    f: FunctionProto
    for f in model.functions:
        for node in f.node:
            yield from node_tensors(node)


def tensor_nbytes(t: TensorProto) -> Optional[int]:
    """Bytes the tensor's dims and dtype call for (None for strings and sub-byte types)."""
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except Exception:  # an unknown or undefined data type: its size is not known
        return None
    if t.data_type in (TensorProto.STRING,) or itemsize == 0:
        return None
    n = 1
    for d in t.dims:
        n *= d
    return n * itemsize


def inline_nbytes(t: TensorProto) -> int:
    """Bytes of ``t``'s ``raw_data`` when its size follows from its dims (0 otherwise)."""
    return (tensor_nbytes(t) or 0) if t.HasField("raw_data") and t.data_type not in PACKED_TYPES else 0


def external_info(t: TensorProto) -> Dict[str, str]:
    """The ``external_data`` key/value entries of ``t`` (location, offset, length ...)."""
    return {e.key: e.value for e in t.external_data}


def external_path(t: TensorProto, base_dir: Optional[PathLike]) -> Path:
    """The file holding the external data of ``t``."""
    return Path(base_dir or ".") / external_info(t)["location"]


def external_offset(t: TensorProto) -> int:
    return int(external_info(t).get("offset", 0) or 0)


def in_model_file(t: TensorProto) -> bool:
    """True for an inline weight whose bytes were left in the model file at load (they are
    read from there, checked to be the same file, when needed; written back inline)."""
    return t.data_location == TensorProto.EXTERNAL and any(e.key == IN_MODEL_FILE for e in t.external_data)


def in_data_file(t: TensorProto) -> bool:
    """True for a tensor in a separate external data file (not :func:`in_model_file`)."""
    return t.data_location == TensorProto.EXTERNAL and not in_model_file(t)


def file_identity(st: os.stat_result) -> str:
    """A file's device, inode, size and modification time: what tells that a file is still the
    one that was loaded (:func:`open_tensor_file`, ``FuseResult.source_unchanged``)."""
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def path_identity(path: PathLike) -> Optional[str]:
    """:func:`file_identity` of the file at ``path`` now; None if there is none (removed)."""
    try:
        return file_identity(os.stat(path))
    except OSError:
        return None


@contextlib.contextmanager
def open_tensor_file(t: TensorProto, base_dir: Optional[PathLike]) -> Iterator[io.BufferedReader]:
    """The file holding ``t``'s external bytes, open for reading. For a weight left in the
    model file, the file must still be the one loaded (same inode, size and modification
    time, before and after the read): a model replaced, rewritten or removed meanwhile is an
    error naming it (:class:`~bnfold.errors.SourceChangedError`, not a fold's reason), never a
    mix of old structure and new weights."""
    mark = external_info(t).get(IN_MODEL_FILE)
    path = external_path(t, base_dir)
    if mark is None:
        with open(path, "rb") as f:
            yield f
        return
    try:
        f = open(path, "rb")
    except OSError:
        raise SourceChangedError(path) from None

    def still_loaded() -> None:
        if file_identity(os.fstat(f.fileno())) != mark:
            raise SourceChangedError(path)

    with f:
        still_loaded()
        try:
            yield f
        except MalformedModelError:  # a short read: because the file changed, if it did
            still_loaded()
            raise
        still_loaded()


def read_tensor(t: TensorProto, base_dir: Optional[PathLike]) -> np.ndarray:
    """The values of ``t``, reading only its own bytes when it lives in external data."""
    if in_model_file(t):
        return _read_from_model_file(t, base_dir)
    if t.data_location != TensorProto.EXTERNAL:
        n = tensor_nbytes(t)
        if t.HasField("raw_data") and n is not None and t.data_type not in PACKED_TYPES:
            raw = t.raw_data  # each access of the field copies its bytes: once is enough
            if len(raw) != n:
                raise MalformedModelError(f"tensor '{t.name}' holds {len(raw)} bytes, its dims call for {n}")
            if sys.byteorder == "little" and not t.HasField("segment"):  # as numpy_helper.to_array: a read-only view
                dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
                return np.frombuffer(raw, dtype=dtype).reshape(tuple(t.dims))
        try:
            return numpy_helper.to_array(t)
        except ValueError as e:  # typed data (float_data, ...) whose count does not match the dims
            raise MalformedModelError(f"tensor '{t.name}' data does not match its dims ({e})") from None
    return external_view(t, base_dir)  # read-only map: pages are read as they are used


def _read_from_model_file(t: TensorProto, base_dir: Optional[PathLike]) -> np.ndarray:
    """A weight left in the model file: read (not mapped: a file cut short must give an error,
    not SIGBUS) into a read-only array, as inline weights are."""
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
    out = np.empty(tuple(t.dims), dtype)
    with open_tensor_file(t, base_dir) as f:
        f.seek(external_offset(t))
        if f.readinto(out.data.cast("B")) != out.nbytes:
            raise SourceChangedError(external_path(t, base_dir))
    out.flags.writeable = False
    return out


def external_view(t: TensorProto, base_dir: Optional[PathLike]) -> np.ndarray:
    """A read-only memory map of an external tensor (locations were checked at load)."""
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
    shape = tuple(t.dims)
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype)
    try:
        return np.memmap(external_path(t, base_dir), dtype=dtype, mode="r", offset=external_offset(t), shape=shape)
    except ValueError:  # shorter than when it was checked at load: it changed while bnfold ran
        raise MalformedModelError(f"external data of tensor '{t.name}' ends early (its file changed while bnfold "
                                  "read it)") from None


def external_files(model: ModelProto, base_dir: Optional[PathLike]) -> Set[Path]:
    """The external data files ``model`` refers to, resolved against ``base_dir``."""
    return {(Path(base_dir or ".") / external_info(t).get("location", "")).resolve()
            for t in iter_tensors(model) if in_data_file(t)}


def uses_external_data(model: ModelProto) -> bool:
    """Whether ``model`` keeps tensors in external data files (weights left in the model file
    at load do not count: they are written back inline)."""
    return any(in_data_file(t) for t in iter_tensors(model))


def set_tensor_data(tensor: TensorProto, value: np.ndarray) -> None:
    """Replace the data of ``tensor`` (same dims) by ``value`` inline, keeping name and doc."""
    if sys.byteorder == "little" and onnx.helper.np_dtype_to_tensor_dtype(value.dtype) == tensor.data_type:
        for f in VALUE_FIELDS + ("external_data", "data_location"):
            tensor.ClearField(f)
        tensor.raw_data = np.ascontiguousarray(value).tobytes()
        return
    fresh = numpy_helper.from_array(value, tensor.name)
    fresh.doc_string = tensor.doc_string
    tensor.CopyFrom(fresh)
