"""Loading a model safely: anything that is not a usable ONNX model is refused with a
:class:`~bnfold.errors.BnfoldError` that names the file and the problem."""
from __future__ import annotations

import contextlib
import mmap
import os
import stat
import sys
from pathlib import Path
from typing import BinaryIO, Iterator, List, Optional, Tuple, Union

import onnx
from onnx import ModelProto, TensorProto
from onnx.external_data_helper import load_external_data_for_model

from ..errors import BnfoldError, PathLike
from .external import check_external_data
from .stream import copy_except, split_weights
from .tensors import IN_MODEL_FILE, PACKED_TYPES, file_identity, tensor_nbytes, uses_external_data


def load_model(path: PathLike, *, load_external: bool = True) -> ModelProto:
    """Load an ONNX model from ``path``, validating it enough to work on safely."""
    return load_model_info(path, load_external=load_external)[0]


# Inline weights from this size are left in the file by load_source(leave_weights=True).
LEAVE_MIN_BYTES = 1 << 14


def load_model_info(path: PathLike, *, load_external: bool = True) -> Tuple[ModelProto, bool]:
    """Like :func:`load_model`, also saying whether the file used external data."""
    model, external, _ = load_source(path, load_external=load_external)
    return model, external


def load_source(path: PathLike, *, load_external: bool = True, leave_weights: bool = False
                ) -> Tuple[ModelProto, bool, Optional[str]]:
    """Like :func:`load_model_info`, also giving the file's identity as it was read
    (:func:`~bnfold.modelio.tensors.file_identity`; None for a pipe): compared again before an
    output replaces or is judged against the file, it tells that the file changed meanwhile.

    With ``leave_weights`` (and ``load_external`` false) the main graph's large inline weights
    are not parsed: each becomes a reference to its bytes in the model file
    (:func:`~bnfold.modelio.tensors.in_model_file`), which :func:`~bnfold.modelio.tensors.read_tensor`
    reads and the writer copies back inline, checking first that the file is still the one
    loaded. A fold then touches each weight's bytes once instead of copying them through
    protobuf twice (resnet50: parse 0.06 s -> ~0.01 s)."""
    p = Path(path)
    if not p.exists():
        raise BnfoldError("is a symbolic link to nothing (dangling or a loop)" if p.is_symlink() else "no such file",
                          p)
    if p.is_dir():
        raise BnfoldError("is a directory, not an ONNX file", p)
    model = ModelProto()
    identity = None
    try:
        leave = leave_weights and not load_external and sys.byteorder == "little"
        with open(p, "rb") as f, _contents(f, mapped=leave) as data:
            st = os.fstat(f.fileno())
            identity = file_identity(st) if stat.S_ISREG(st.st_mode) else None
            if not len(data):
                raise BnfoldError("is empty, not an ONNX model", p)
            try:
                split = None
                if leave and isinstance(data, memoryview) and identity is not None:
                    try:
                        split = split_weights(data, LEAVE_MIN_BYTES)
                    except (ValueError, IndexError):  # not plain protobuf: protobuf's parser decides
                        pass
                    if split is not None:
                        model.ParseFromString(split[0])
                        _leave_in_file(model, split[1], data, p, identity)
                if split is None:  # parsed from a copy, never from the map (see _contents)
                    model.ParseFromString(data if isinstance(data, bytes) else bytes(data))
            except Exception:  # protobuf's DecodeError and friends: any parse failure means "not ONNX"
                raise BnfoldError("is not an ONNX model (it does not parse as ONNX protobuf: truncated or another "
                                  "format?)", p) from None
    except OSError as e:
        raise BnfoldError(f"cannot be read ({e.strerror or e})", p) from None
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise BnfoldError("is not an ONNX model (no IR version or no graph)", p)
    check_versions(model, p)
    check_structure(model, p)
    external = uses_external_data(model)
    if external:
        check_external_data(model, p)
    if load_external and external:
        try:
            load_external_data_for_model(model, str(p.parent))
        except Exception as e:  # onnx raises several types for unreadable data; all are the input's fault
            raise BnfoldError(f"cannot read its external data ({e})", p) from None
    return model, external, identity


def _leave_in_file(model: ModelProto, left_out: List[Tuple[int, int, int]], data: memoryview, path: Path,
                   identity: str) -> None:
    """Point each initializer whose raw_data :func:`split_weights` left out at its bytes in the
    model file; one whose size does not follow from its dims gets its bytes back inline (its
    fold then reports the mismatch, as for any inline tensor)."""
    initializers = model.graph.initializer
    for k, offset, length in left_out:
        t = initializers[k]
        if t.data_type in PACKED_TYPES or tensor_nbytes(t) != length:
            t.raw_data = bytes(data[offset:offset + length])
            continue
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", path.name), ("offset", str(offset)), ("length", str(length)),
                           (IN_MODEL_FILE, identity)):
            t.external_data.add(key=key, value=value)


@contextlib.contextmanager
def _contents(f: BinaryIO, mapped: bool) -> Iterator[Union[bytes, memoryview]]:
    """The bytes of file ``f``: with ``mapped``, a read-only memory map of a regular file (for
    :func:`~bnfold.modelio.stream.split_weights`, which reads only the fields' headers: a file
    rewritten in place while it is mapped ends the process with SIGBUS, a window of a few ms
    here), else, or for a pipe or an empty file, what ``read()`` gives. Whole parses read a
    copy: protobuf parsed a map in 0.06 s instead of 0.11 s on resnet50, but `fuse`'s
    verification parses the model again while a new export may be rewriting it (SIGBUS seen
    by a user trial)."""
    if not mapped:
        yield f.read()
        return
    try:
        mapped_file = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):  # not mappable, or empty
        yield f.read()
        return
    view = memoryview(mapped_file)
    try:
        yield view
    finally:
        view.release()
        mapped_file.close()


def check_structure(model: ModelProto, path: PathLike) -> None:
    """Run the ONNX checker on the model's structure (main-graph weights left out, so the
    cost does not grow with their size); refuse what it rejects, naming the check."""
    skeleton = copy_except(model, "graph")
    graph = skeleton.graph
    graph.CopyFrom(copy_except(model.graph, "initializer"))
    for t in model.graph.initializer:
        if t.data_type == TensorProto.STRING:
            graph.initializer.append(t)
            continue
        # A one-element stand-in of the same rank and type: shapes are not inferred here.
        stub = graph.initializer.add()
        stub.name, stub.data_type = t.name, t.data_type
        stub.dims.extend([1] * len(t.dims))
        stub.raw_data = b"\0" * max(1, (tensor_nbytes(stub) or 1))
    try:
        onnx.checker.check_model(skeleton)
    except Exception as e:  # ValidationError, and C++ errors surfacing as other types
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        raise BnfoldError(f"the ONNX checker rejects it: {lines[0] if lines else type(e).__name__}", path) from None


def check_versions(model: ModelProto, path: PathLike) -> None:
    """Refuse IR and opset versions newer than the installed onnx understands."""
    if model.ir_version > onnx.IR_VERSION:
        raise BnfoldError(f"IR version {model.ir_version} is newer than onnx {onnx.__version__} supports "
                          f"(up to {onnx.IR_VERSION}); upgrade onnx", path)
    newest = onnx.defs.onnx_opset_version()
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and op.version > newest:
            raise BnfoldError(f"opset {op.version} is newer than onnx {onnx.__version__} supports "
                              f"(up to {newest}); upgrade onnx", path)
