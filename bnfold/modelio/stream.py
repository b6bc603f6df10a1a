"""Streaming serialization: a model written piece by piece, without a second copy of its weights.

Everything but the main graph's initializers is written as ordinary protobuf, then each
initializer as a length-delimited field whose raw bytes come straight from the tensor (or
its pending replacement, or the model file it was left in). Protobuf parsers accept fields
in any order and append repeated fields, so the result parses to the same model.

:func:`split_weights` is the reading side: it finds the main graph's large ``raw_data`` fields
in a serialized model, so that a load can parse the rest and leave those bytes in the file.
"""
from __future__ import annotations

import io
import sys
from typing import BinaryIO, Iterator, List, Mapping, Optional, Tuple, TypeVar, Union

import numpy as np
import onnx
from google.protobuf.message import Message
from onnx import ModelProto, TensorProto, numpy_helper

from ..errors import MalformedModelError, PathLike
from .pending import PendingValue, as_array
from .tensors import PACKED_TYPES, VALUE_FIELDS, in_model_file, tensor_nbytes

_GRAPH = ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_RAW_DATA = TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number
_SEGMENT = TensorProto.DESCRIPTOR.fields_by_name["segment"].number
_DATA_LOCATION = TensorProto.DESCRIPTOR.fields_by_name["data_location"].number

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


def _read_varint(buf: memoryview, pos: int) -> Tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _wire_fields(buf: memoryview, start: int, end: int) -> Iterator[Tuple[int, int, int, int, int]]:
    """(field number, wire type, field start, value start, field end) of each field in
    ``buf[start:end]``; a length-delimited value is ``buf[value start:field end]``."""
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _read_varint(buf, pos)
        wire = key & 7
        value_start = pos
        if wire == 0:
            _, pos = _read_varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            n, value_start = _read_varint(buf, pos)
            pos = value_start + n
        elif wire == 5:
            pos += 4
        else:  # groups: not in ONNX
            raise ValueError(f"wire type {wire}")
        if pos > end:
            raise ValueError("field runs past its message")
        yield key >> 3, wire, field_start, value_start, pos


def split_weights(buf: memoryview, min_bytes: int) -> Optional[Tuple[bytes, List[Tuple[int, int, int]]]]:
    """The serialized model ``buf`` without the ``raw_data`` of its main-graph initializers of
    ``min_bytes`` or more, and for each left out ``(initializer index, offset in buf, length)``.

    None when there is nothing to leave out or the layout is not the plain one (the graph
    field repeated, a tensor with a segment, a data location or several raw_data fields):
    the caller parses ``buf`` whole. Raises ValueError for bytes that are not protobuf."""
    pieces: List[Union[bytes, memoryview]] = []
    left_out: List[Tuple[int, int, int]] = []
    graphs = 0
    for field, wire, start, value, end in _wire_fields(buf, 0, len(buf)):
        if field != _GRAPH or wire != 2:
            pieces.append(buf[start:end])
            continue
        graphs += 1
        if graphs > 1:
            return None
        graph: List[Union[bytes, memoryview]] = []
        k = 0
        for g_field, g_wire, g_start, g_value, g_end in _wire_fields(buf, value, end):
            if g_field != _INITIALIZER or g_wire != 2:
                graph.append(buf[g_start:g_end])
                continue
            raw = []
            plain = True
            for t_field, _, t_start, t_value, t_end in _wire_fields(buf, g_value, g_end):
                if t_field == _RAW_DATA:
                    raw.append((t_start, t_value, t_end))
                elif t_field in (_SEGMENT, _DATA_LOCATION):
                    plain = False
            if plain and len(raw) == 1 and raw[0][2] - raw[0][1] >= min_bytes:
                t_start, t_value, t_end = raw[0]
                size = (t_start - g_value) + (g_end - t_end)
                graph += [_key(_INITIALIZER) + _varint(size), buf[g_value:t_start], buf[t_end:g_end]]
                left_out.append((k, t_value, t_end - t_value))
            else:
                graph.append(buf[g_start:g_end])
            k += 1
        pieces += [_key(_GRAPH) + _varint(sum(len(p) for p in graph))] + graph
    if not left_out:
        return None
    return b"".join(pieces), left_out


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
        return _head(t), replacement.nbytes
    n = tensor_nbytes(t)
    if in_model_file(t) and n is not None:
        return _head(t), n
    if t.HasField("raw_data") and n is not None and t.data_type not in PACKED_TYPES:
        return copy_except(t, "raw_data").SerializeToString(), n
    return t.SerializeToString(), None


def _head(t: TensorProto) -> bytes:
    """``t`` without its data (raw bytes follow it), as an inline tensor."""
    head = copy_except(t, "raw_data")
    for f in VALUE_FIELDS + ("external_data", "data_location"):
        head.ClearField(f)
    return head.SerializeToString()


def write_model(model: ModelProto, f: BinaryIO, replacements: Optional[Mapping[str, PendingValue]] = None,
                base_dir: Optional[PathLike] = None) -> None:
    """Serialize ``model`` to the binary file ``f``, streaming the main graph's initializers
    (those named in ``replacements`` with their new values; those left in the model file
    at load copied from it, ``base_dir`` being its folder)."""
    from .external import copy_external, write_bytes

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
        if value is None and in_model_file(t):
            f.write(_key(_RAW_DATA) + _varint(n))
            copy_external(t, base_dir, f)
            continue
        data: Union[memoryview, bytes] = (np.ascontiguousarray(value).data.cast("B") if value is not None
                                          else t.raw_data)
        if len(data) != n:
            raise MalformedModelError(f"tensor '{t.name}' holds {len(data)} bytes, its dims call for {n}")
        f.write(_key(_RAW_DATA) + _varint(n))
        write_bytes(f, data)


def serialize(model: ModelProto) -> bytes:
    """The bytes :func:`write_model` writes (for tests and small models)."""
    buf = io.BytesIO()
    write_model(model, buf)
    return buf.getvalue()
