"""Reading models safely and writing them atomically.

Loading refuses what is not a usable ONNX model with a :class:`BnfoldError` that
names the file; it never follows external-data locations outside the model's
folder. Saving writes to a temporary file in the destination folder and renames
it into place, so an interrupted or failed write leaves any old output intact and
no partial file behind.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
import sys
from typing import Dict, Iterable, Iterator, Optional, Tuple

import numpy as np
import onnx
from onnx import ModelProto, TensorProto, numpy_helper
from onnx.external_data_helper import load_external_data_for_model

from .errors import BnfoldError, MalformedModelError, PathLike

# Sub-byte and string types: their raw_data length does not follow from dims x itemsize.
_PACKED_TYPES = {TensorProto.STRING} | {getattr(TensorProto, n) for n in
                                        ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2") if hasattr(TensorProto, n)}
# Above this size the output goes to external data even when the input had none.
EXTERNAL_THRESHOLD = 2**31 - 2**26


def iter_tensors(model: ModelProto) -> Iterator[TensorProto]:
    """Every TensorProto that can hold weights: initializers and tensor attributes, all scopes."""

    def graph_tensors(graph):
        yield from graph.initializer
        for sp in graph.sparse_initializer:
            yield sp.values
            yield sp.indices
        for node in graph.node:
            yield from node_tensors(node)

    def node_tensors(node):
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from graph_tensors(a.g)
            for g in a.graphs:
                yield from graph_tensors(g)

    yield from graph_tensors(model.graph)
    for f in model.functions:
        for node in f.node:
            yield from node_tensors(node)


# The typed value fields of a TensorProto, besides raw_data and string_data.
_VALUE_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")


def as_array(value) -> np.ndarray:
    """A pending tensor value as an array: arrays as they are, a :class:`ScaledTensor` computed now."""
    return value if isinstance(value, np.ndarray) else value.materialize()


def _external_info(t: TensorProto) -> Dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def read_tensor(t: TensorProto, base_dir: Optional[PathLike]) -> np.ndarray:
    """The values of ``t``, reading only its own bytes when it lives in external data."""
    if t.data_location != TensorProto.EXTERNAL:
        n = tensor_nbytes(t)
        if t.HasField("raw_data") and n is not None and t.data_type not in _PACKED_TYPES and len(t.raw_data) != n:
            raise MalformedModelError(f"tensor '{t.name}' holds {len(t.raw_data)} bytes, its dims call for {n}")
        try:
            return numpy_helper.to_array(t)
        except ValueError as e:  # typed data (float_data, ...) whose count does not match the dims
            raise MalformedModelError(f"tensor '{t.name}' data does not match its dims ({e})") from None
    return external_view(t, base_dir)  # read-only map: pages are read as they are used


def external_view(t: TensorProto, base_dir: Optional[PathLike]) -> np.ndarray:
    """A read-only memory map of an external tensor (locations were checked at load)."""
    info = _external_info(t)
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
    path = Path(base_dir or ".") / info["location"]
    shape = tuple(t.dims)
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=int(info.get("offset", 0) or 0), shape=shape)


class ScaledTensor:
    """A folded weight not yet computed: ``round(source * factor)`` in ``dtype``.

    Kept for weights in external data, so that a model of many gigabytes is folded
    with a few tensors in memory at a time: the values are computed block by block
    while the output is written.
    """

    def __init__(self, source: TensorProto, base_dir: Optional[PathLike], factor: np.ndarray, dtype) -> None:
        self.source, self.base_dir, self.factor, self.dtype = source, base_dir, factor, np.dtype(dtype)
        self.shape = tuple(source.dims)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize

    def materialize(self) -> np.ndarray:
        from .numerics import scale_round

        return scale_round(read_tensor(self.source, self.base_dir), self.factor, self.dtype, "the folded weight")

    def blocks(self, block_bytes: int = 1 << 24) -> Iterator[np.ndarray]:
        """The folded values, a block of leading-axis rows at a time (read into one reused buffer)."""
        from .numerics import scale_round

        shape = self.shape
        if len(shape) == 0 or 0 in shape:
            yield self.materialize()
            return
        src_dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.source.data_type))
        row = int(np.prod(shape[1:]))
        rows = max(1, block_bytes // max(1, row * src_dtype.itemsize))
        per_row = self.factor.ndim == len(shape) and self.factor.shape[0] != 1
        info = _external_info(self.source)
        buf = np.empty(min(rows, shape[0]) * row, src_dtype)
        with open(Path(self.base_dir or ".") / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0) or 0))
            for i in range(0, shape[0], rows):
                n = min(rows, shape[0] - i)
                view = buf[:n * row]
                if f.readinto(memoryview(view).cast("B")) != view.nbytes:
                    raise MalformedModelError(f"external data of tensor '{self.source.name}' ends early")
                f_block = self.factor[i:i + n] if per_row else self.factor
                yield scale_round(view.reshape((n,) + tuple(shape[1:])), f_block, self.dtype, "the folded weight")


def external_files(model: ModelProto, base_dir: Optional[PathLike]) -> set:
    """The external data files ``model`` refers to, resolved against ``base_dir``."""
    return {(Path(base_dir or ".") / _external_info(t).get("location", "")).resolve()
            for t in iter_tensors(model) if t.data_location == TensorProto.EXTERNAL}


def uses_external_data(model: ModelProto) -> bool:
    return any(t.data_location == TensorProto.EXTERNAL for t in iter_tensors(model))


def load_model(path: PathLike, *, load_external: bool = True) -> ModelProto:
    """Load an ONNX model from ``path``, validating it enough to work on safely."""
    return load_model_info(path, load_external=load_external)[0]


def load_model_info(path: PathLike, *, load_external: bool = True) -> Tuple[ModelProto, bool]:
    """Like :func:`load_model`, also saying whether the file used external data."""
    p = Path(path)
    if not p.exists():
        raise BnfoldError("no such file", p)
    if p.is_dir():
        raise BnfoldError("is a directory, not an ONNX file", p)
    try:
        with open(p, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BnfoldError(f"cannot be read ({e.strerror or e})", p) from None
    if not data:
        raise BnfoldError("is empty, not an ONNX model", p)
    model = ModelProto()
    try:
        model.ParseFromString(data)
    except Exception:
        raise BnfoldError("is not an ONNX model (it does not parse as ONNX protobuf: truncated or another format?)",
                          p) from None
    del data
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
        except Exception as e:
            raise BnfoldError(f"cannot read its external data ({e})", p) from None
    return model, external


def check_structure(model: ModelProto, path: PathLike) -> None:
    """Run the ONNX checker on the model's structure (main-graph weights left out, so the
    cost does not grow with their size); refuse what it rejects, naming the check."""
    skeleton = _copy_except(model, "graph")
    graph = skeleton.graph
    graph.CopyFrom(_copy_except(model.graph, "initializer"))
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
    except Exception as e:
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


def check_external_data(model: ModelProto, path: PathLike) -> None:
    """Refuse external data that is missing, short, or outside the model's folder."""
    base = Path(path).parent.resolve()
    sizes = {}
    for t in iter_tensors(model):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = _external_info(t)
        loc = info.get("location", "")
        where = f"tensor '{t.name}' external data location '{loc}'"
        if not loc:
            raise BnfoldError(f"tensor '{t.name}' has external data without a location", path)
        if os.path.isabs(loc) or ".." in Path(loc).parts or "\\" in loc:
            raise BnfoldError(f"{where} is absolute or contains '..': refused", path)
        full = (base / loc).resolve()
        if base != full and base not in full.parents:
            raise BnfoldError(f"{where} resolves outside the model's folder: refused", path)
        if not full.is_file():
            raise BnfoldError(f"{where}: file is missing", path)
        if full not in sizes:
            sizes[full] = full.stat().st_size
        offset = int(info.get("offset", 0) or 0)
        length = info.get("length")
        need = tensor_nbytes(t)
        if length is not None and need is not None and int(length) != need:
            raise BnfoldError(f"{where}: length {length} differs from the {need} bytes its dims need", path)
        end = offset + (int(length) if length is not None else (need or 0))
        if end > sizes[full]:
            raise BnfoldError(f"{where}: file is {sizes[full]} bytes, shorter than the {end} bytes it should hold",
                              path)


def tensor_nbytes(t: TensorProto) -> Optional[int]:
    """Bytes the tensor's dims and dtype call for (None for strings and sub-byte types)."""
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except Exception:
        return None
    if t.data_type in (TensorProto.STRING,) or itemsize == 0:
        return None
    n = 1
    for d in t.dims:
        n *= d
    return n * itemsize


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    p = Path(path)
    _check_writable_folder(p)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, p)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise BnfoldError(f"could not be written ({e.strerror or e}); nothing was changed", p) from None
        raise


def _check_writable_folder(p: Path) -> None:
    folder = p.parent
    if not folder.is_dir():
        raise BnfoldError(f"output folder '{folder}' does not exist", p)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BnfoldError(f"output folder '{folder}' is not writable", p)
    if p.is_dir():
        raise BnfoldError("output path is a directory", p)


class StagedModel:
    """A model written to a private folder beside its destination, not yet visible.

    ``path`` can be loaded and verified as the final file would be (external data
    included); :meth:`commit` renames the files into place, :meth:`discard` (or
    leaving the ``with`` block uncommitted) removes them.
    """

    def __init__(self, target: Path, tmpdir: str, files: Tuple[str, ...]) -> None:
        self.target = target
        self.tmpdir = tmpdir
        self.files = files
        self.path = os.path.join(tmpdir, target.name)

    def commit(self) -> None:
        mode = 0o666 & ~_umask()
        try:
            for name in self.files:  # data before the model that refers to it
                src = os.path.join(self.tmpdir, name)
                os.chmod(src, mode)
                os.replace(src, self.target.parent / name)
        except OSError as e:
            raise BnfoldError(f"could not be written ({e.strerror or e})", self.target) from None
        finally:
            self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self) -> "StagedModel":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


def stage_model(model: ModelProto, path: PathLike, *, external_data: Optional[bool] = None,
                replacements: Optional[Dict[str, object]] = None, base_dir: Optional[PathLike] = None,
                avoid: Iterable[Path] = ()) -> StagedModel:
    """Write ``model`` for ``path`` into a temporary folder beside it (see :class:`StagedModel`).

    ``replacements`` gives new data for main-graph initializers by name (arrays or
    :class:`ScaledTensor`); they are streamed to disk without entering the model.
    Tensors still in external data are read from ``base_dir``. With
    ``external_data`` (or when the weights pass protobuf's 2 GB limit) the weights go
    to ``<name>.data`` beside the model, copied or computed piece by piece; that
    converts the tensors of ``model`` in place to refer to that file, named after the
    output and never one of the files in ``avoid`` (the input's data files).
    """
    p = Path(path)
    _check_writable_folder(p)
    replacements = dict(replacements or {})
    if uses_external_data(model):
        external_data = True  # its weights stay out of the protobuf, as they came
    elif external_data is None:
        external_data = sum(tensor_nbytes(t) or 0 for t in iter_tensors(model)) > EXTERNAL_THRESHOLD
    tmpdir = tempfile.mkdtemp(dir=p.parent, prefix=f".{p.name}.")
    try:
        if external_data:
            data_name = p.name + ".data"
            taken = {Path(a).resolve() for a in avoid}
            k = 0
            while (p.parent / data_name).resolve() in taken:
                k += 1
                data_name = f"{p.name}.{k}.data"
            with open(os.path.join(tmpdir, data_name), "wb") as data_file:
                write_external_data(model, data_file, data_name, replacements, base_dir)
            with open(os.path.join(tmpdir, p.name), "wb") as f:
                write_model(model, f)
            files = (data_name, p.name)
        else:
            # Atomic against interruption and write errors (temporary file, then rename); no
            # fsync: a power-loss barrier would cost ~10% of a fold and the input is never touched.
            with open(os.path.join(tmpdir, p.name), "wb") as f:
                write_model(model, f, replacements)
            files = (p.name,)
    except BaseException as e:
        shutil.rmtree(tmpdir, ignore_errors=True)
        if isinstance(e, OSError):
            raise BnfoldError(f"could not be written ({e.strerror or e}); nothing was changed", p) from None
        if isinstance(e, MalformedModelError):  # the input's tensor data does not match its dims
            raise BnfoldError(f"could not be written ({e}); nothing was changed", p) from None
        raise
    return StagedModel(p, tmpdir, files)


_ALIGN = 4096  # external tensors start on page boundaries, so runtimes can map them
_INLINE_BYTES = 1024


def set_tensor_data(tensor: TensorProto, value: np.ndarray) -> None:
    """Replace the data of ``tensor`` (same dims) by ``value`` inline, keeping name and doc."""
    if sys.byteorder == "little" and onnx.helper.np_dtype_to_tensor_dtype(value.dtype) == tensor.data_type:
        for f in _VALUE_FIELDS + ("external_data", "data_location"):
            tensor.ClearField(f)
        tensor.raw_data = np.ascontiguousarray(value).tobytes()
        return
    fresh = numpy_helper.from_array(value, tensor.name)
    fresh.doc_string = tensor.doc_string
    tensor.CopyFrom(fresh)


def write_external_data(model: ModelProto, data_file, data_name: str, replacements: Dict[str, object],
                        base_dir: Optional[PathLike]) -> None:
    """Write every large or external tensor of ``model`` into ``data_file`` and point the
    tensors at it. Replaced initializers take their new data; external tensors are
    copied piece by piece from their source; nothing is held whole in memory."""
    main = list(model.graph.initializer)
    main_ids = {id(t) for t in main}
    others = [t for t in iter_tensors(model) if id(t) not in main_ids]
    offset = 0
    for t in main + others:
        rep = replacements.get(t.name) if id(t) in main_ids else None
        external = t.data_location == TensorProto.EXTERNAL
        size = rep.nbytes if rep is not None else (tensor_nbytes(t) or 0) if external else _inline_nbytes(t)
        if size <= _INLINE_BYTES:  # small tensors live in the model (runtimes read shapes from them)
            if rep is not None or external:
                set_tensor_data(t, as_array(rep) if rep is not None else read_tensor(t, base_dir))
            continue
        pad = (-offset) % _ALIGN
        data_file.write(b"\0" * pad)
        offset += pad
        start = offset
        if isinstance(rep, np.ndarray):
            offset += _write_array(data_file, rep)
        elif rep is not None:
            for block in _prefetched(rep.blocks()):  # compute the next block while this one is written
                offset += _write_array(data_file, block)
        elif external:
            offset += _copy_external(t, base_dir, data_file)
        else:
            raw = t.raw_data
            data_file.write(raw)
            offset += len(raw)
        for f in ("raw_data", "external_data") + _VALUE_FIELDS:
            t.ClearField(f)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", data_name), ("offset", str(start)), ("length", str(offset - start))):
            t.external_data.add(key=key, value=value)


def _prefetched(blocks: Iterator[np.ndarray], depth: int = 2) -> Iterator[np.ndarray]:
    """Iterate ``blocks`` computed in a worker thread, at most ``depth`` ahead (numpy and
    file writes release the GIL, so computing and writing overlap)."""
    import queue
    import threading

    q: "queue.Queue" = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for b in blocks:
                while not stop.is_set():
                    try:
                        q.put(b, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # handed to the consumer
            q.put(e)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join()


def _inline_nbytes(t: TensorProto) -> int:
    return (tensor_nbytes(t) or 0) if t.HasField("raw_data") and t.data_type not in _PACKED_TYPES else 0


def _write_array(f, value: np.ndarray) -> int:
    arr = np.ascontiguousarray(value)
    if sys.byteorder != "little":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    f.write(memoryview(arr).cast("B"))
    return arr.nbytes


def _copy_external(t: TensorProto, base_dir: Optional[PathLike], out) -> int:
    info = _external_info(t)
    offset = int(info.get("offset", 0) or 0)
    length = int(info["length"]) if info.get("length") else tensor_nbytes(t)
    with open(Path(base_dir or ".") / info["location"], "rb") as src:
        src.seek(offset)
        left = length
        while left:
            chunk = src.read(min(left, 1 << 24))
            if not chunk:
                raise MalformedModelError(f"external data of tensor '{t.name}' ends early")
            out.write(chunk)
            left -= len(chunk)
    return length


# -- streaming serialization ---------------------------------------------------------------
# A model is written piece by piece: everything but the main graph's initializers as
# ordinary protobuf, then each initializer as a length-delimited field whose raw bytes
# come straight from the tensor (or its replacement). Protobuf parsers accept fields in
# any order and append repeated fields, so the result parses to the same model, without
# a second in-memory copy of all weights.

_GRAPH = ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_RAW_DATA = TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number


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


def _copy_except(msg, skip: str):
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


def _tensor_pieces(t: TensorProto, replacement: Optional[np.ndarray]):
    """(head bytes, raw-data length or None) for one initializer."""
    if replacement is not None:
        if onnx.helper.np_dtype_to_tensor_dtype(replacement.dtype) != t.data_type or sys.byteorder != "little":
            fresh = numpy_helper.from_array(replacement, t.name)
            fresh.doc_string = t.doc_string
            return fresh.SerializeToString(), None
        head = _copy_except(t, "raw_data")
        for f in _VALUE_FIELDS:
            head.ClearField(f)
        return head.SerializeToString(), replacement.nbytes
    n = tensor_nbytes(t)
    if t.HasField("raw_data") and n is not None and t.data_type not in _PACKED_TYPES:
        return _copy_except(t, "raw_data").SerializeToString(), n
    return t.SerializeToString(), None


def write_model(model: ModelProto, f, replacements: Optional[Dict[str, np.ndarray]] = None) -> None:
    """Serialize ``model`` to the binary file ``f``, streaming the main graph's initializers."""
    replacements = replacements or {}
    f.write(_copy_except(model, "graph").SerializeToString())
    graph = model.graph
    graph_head = _copy_except(graph, "initializer").SerializeToString()
    pieces = []
    total = len(graph_head)
    for t in graph.initializer:
        head, n = _tensor_pieces(t, replacements.get(t.name))
        body = len(head) + (0 if n is None else len(_key(_RAW_DATA)) + len(_varint(n)) + n)
        total += len(_key(_INITIALIZER)) + len(_varint(body)) + body
        pieces.append((t, head, n, body))
    f.write(_key(_GRAPH) + _varint(total))
    f.write(graph_head)
    for t, head, n, body in pieces:
        f.write(_key(_INITIALIZER) + _varint(body))
        f.write(head)
        if n is None:
            continue
        value = replacements.get(t.name)
        data = memoryview(np.ascontiguousarray(value)).cast("B") if value is not None else t.raw_data
        if len(data) != n:
            raise MalformedModelError(f"tensor '{t.name}' holds {len(data)} bytes, its dims call for {n}")
        f.write(_key(_RAW_DATA) + _varint(n))
        f.write(data)


def save_model(model: ModelProto, path: PathLike, *, external_data: Optional[bool] = None) -> None:
    """Write ``model`` to ``path`` atomically (see :func:`stage_model`)."""
    stage_model(model, path, external_data=external_data).commit()


def serialize(model: ModelProto) -> bytes:
    """The bytes :func:`write_model` writes (for tests and small models)."""
    import io

    buf = io.BytesIO()
    write_model(model, buf)
    return buf.getvalue()
