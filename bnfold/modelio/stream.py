"""Streaming serialization: a model written piece by piece, without a second copy of its weights.

Everything but the main graph's initializers is written as ordinary protobuf, then each
initializer as a length-delimited field whose raw bytes come straight from the tensor (or
its pending replacement). Protobuf parsers accept fields in any order and append repeated
fields, so the result parses to the same model.
"""
from __future__ import annotations

import io
import sys
from typing import BinaryIO, List, Mapping, Optional, Tuple, TypeVar, Union

import numpy as np
import onnx
from google.protobuf.message import Message
from onnx import ModelProto, TensorProto, numpy_helper

from ..errors import MalformedModelError
from .pending import PendingValue, as_array
from .tensors import PACKED_TYPES, VALUE_FIELDS, tensor_nbytes

_GRAPH = ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_RAW_DATA = TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number

M = TypeVar("M", bound=Message)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field: int) -> bytes:
    return _varint(field << 3 | 2)  # wire type 2: length-delimited


def copy_except(msg: M, skip: str) -> M:
    """A copy of the protobuf message ``msg`` without its field ``skip`` (which is never copied)."""
    head = type(msg)()
    for fd, value in msg.ListFields():
        if fd.name == skip:
            continue
        repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED
        if repeated:
            getattr(head, fd.name).extend(value)
        elif fd.type == fd.TYPE_MESSAGE:
            getattr(head, fd.name).CopyFrom(value)
        else:
            setattr(head, fd.name, value)
    return head


def _tensor_pieces(t: TensorProto, replacement: Optional[np.ndarray]) -> Tuple[bytes, Optional[int]]:
    """(head bytes, raw-data length or None) for one initializer."""
    if replacement is not None:
        if onnx.helper.np_dtype_to_tensor_dtype(replacement.dtype) != t.data_type or sys.byteorder != "little":
            fresh = numpy_helper.from_array(replacement, t.name)
            fresh.doc_string = t.doc_string
            return fresh.SerializeToString(), None
        head = copy_except(t, "raw_data")
        for f in VALUE_FIELDS:
            head.ClearField(f)
        return head.SerializeToString(), replacement.nbytes
    n = tensor_nbytes(t)
    if t.HasField("raw_data") and n is not None and t.data_type not in PACKED_TYPES:
        return copy_except(t, "raw_data").SerializeToString(), n
    return t.SerializeToString(), None


def write_model(model: ModelProto, f: BinaryIO, replacements: Optional[Mapping[str, PendingValue]] = None) -> None:
    """Serialize ``model`` to the binary file ``f``, streaming the main graph's initializers
    (those named in ``replacements`` with their new values)."""
    f.write(copy_except(model, "graph").SerializeToString())
    graph = model.graph
    graph_head = copy_except(graph, "initializer").SerializeToString()
    pieces: List[Tuple[TensorProto, bytes, Optional[int], int, Optional[np.ndarray]]] = []
    total = len(graph_head)
    for t in graph.initializer:
        pending = (replacements or {}).get(t.name)
        value = as_array(pending) if pending is not None else None
        head, n = _tensor_pieces(t, value)
        body = len(head) + (0 if n is None else len(_key(_RAW_DATA)) + len(_varint(n)) + n)
        total += len(_key(_INITIALIZER)) + len(_varint(body)) + body
        pieces.append((t, head, n, body, value))
    f.write(_key(_GRAPH) + _varint(total))
    f.write(graph_head)
    for t, head, n, body, value in pieces:
        f.write(_key(_INITIALIZER) + _varint(body))
        f.write(head)
        if n is None:
            continue
        data: Union[memoryview, bytes] = (np.ascontiguousarray(value).data.cast("B") if value is not None
                                          else t.raw_data)
        if len(data) != n:
            raise MalformedModelError(f"tensor '{t.name}' holds {len(data)} bytes, its dims call for {n}")
        f.write(_key(_RAW_DATA) + _varint(n))
        f.write(data)


def serialize(model: ModelProto) -> bytes:
    """The bytes :func:`write_model` writes (for tests and small models)."""
    buf = io.BytesIO()
    write_model(model, buf)
    return buf.getvalue()
