"""External data: checking a model's ``.data`` references at load, and writing a ``.data`` file.

Loading never follows a location outside the model's folder and refuses files that are
missing or shorter than the tensors they should hold. Writing copies or computes each large
tensor piece by piece into the new file (page-aligned, so runtimes can map it), so nothing
is held whole in memory.
"""
from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
from pathlib import Path
from typing import BinaryIO, Dict, Generator, Iterator, List, Mapping, Optional, Union

import numpy as np
from onnx import ModelProto, TensorProto

from ..errors import BnfoldError, MalformedModelError, PathLike
from .pending import PendingValue, ScaledTensor, as_array, resolved
from .tensors import (VALUE_FIELDS, external_info, external_offset, in_data_file, inline_nbytes, iter_tensors,
                      open_tensor_file, read_tensor, set_tensor_data, tensor_nbytes)

ALIGN = 4096  # external tensors start on page boundaries, so runtimes can map them
INLINE_BYTES = 1024  # smaller tensors stay in the model (runtimes read shapes from them)


def check_external_data(model: ModelProto, path: PathLike) -> None:
    """Refuse external data that is missing, short, or outside the model's folder."""
    base = Path(path).parent.resolve()
    sizes: Dict[Path, int] = {}
    for t in iter_tensors(model):
        if not in_data_file(t):
            continue
        info = external_info(t)
        loc = info.get("location", "")
        where = f"tensor '{t.name}' external data location '{loc}'"
        if not loc:
            raise BnfoldError(f"tensor '{t.name}' has external data without a location", path)
        if os.path.isabs(loc) or ".." in Path(loc).parts or "\\" in loc:
            raise BnfoldError(f"{where} is absolute or contains '..': refused", path)
        try:
            full = (base / loc).resolve()
        except (RuntimeError, OSError):  # a symlink loop: RuntimeError before Python 3.13, OSError since
            raise BnfoldError(f"{where} is a symbolic link loop", path) from None
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


def write_external_data(model: ModelProto, data_file: BinaryIO, data_name: str,
                        replacements: Mapping[str, PendingValue], base_dir: Optional[PathLike]) -> None:
    """Write every large or external tensor of ``model`` into ``data_file`` and point the
    tensors at it. Replaced initializers take their new data; external tensors are
    copied piece by piece from their source; nothing is held whole in memory."""
    main = list(model.graph.initializer)
    main_ids = {id(t) for t in main}
    others = [t for t in iter_tensors(model) if id(t) not in main_ids]
    offset = 0
    with _BlockBuffers(PREFETCH + 2) as buffers:
        for t in main + others:
            pending = replacements.get(t.name) if id(t) in main_ids else None
            rep = resolved(pending) if pending is not None else None
            external = t.data_location == TensorProto.EXTERNAL
            size = rep.nbytes if rep is not None else (tensor_nbytes(t) or 0) if external else inline_nbytes(t)
            if size <= INLINE_BYTES:
                if rep is not None or external:
                    set_tensor_data(t, as_array(rep) if rep is not None else read_tensor(t, base_dir))
                continue
            pad = (-offset) % ALIGN
            data_file.write(b"\0" * pad)
            offset += pad
            start = offset
            if isinstance(rep, ScaledTensor):
                # compute the next blocks while this one is written, into PREFETCH + 2 reused buffers:
                # the one being written, PREFETCH queued, one being computed
                views = buffers.views(rep.dtype, rep.block_nbytes())
                with contextlib.closing(_prefetched(rep.blocks(outs=views), PREFETCH)) as blocks:
                    for block in blocks:  # (closed on any error, Ctrl-C included: the worker stops at once)
                        offset += write_array(data_file, block)
            elif rep is not None:
                offset += write_array(data_file, rep)
            elif external:
                offset += copy_external(t, base_dir, data_file)
            else:
                raw = t.raw_data
                write_bytes(data_file, raw)
                offset += len(raw)
            for f in ("raw_data", "external_data") + VALUE_FIELDS:
                t.ClearField(f)
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(start)), ("length", str(offset - start))):
                t.external_data.add(key=key, value=value)


PREFETCH = 2  # blocks computed ahead of the writer


class _BlockBuffers:
    """``count`` reused output buffers for streamed blocks (fresh arrays per block had cost a zeroed
    page per 4 KiB, a quarter of a 3 GB fold)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._buffers: List[np.ndarray] = []

    def __enter__(self) -> "_BlockBuffers":
        return self

    def __exit__(self, *exc: object) -> None:
        self._buffers = []

    def views(self, dtype: np.dtype, nbytes: int) -> List[np.ndarray]:
        """``count`` flat arrays of ``dtype`` holding at least ``nbytes`` each."""
        if not self._buffers or nbytes > self._buffers[0].nbytes:
            self._buffers = []  # the old ones go first: at most ``count`` buffers at any time
            self._buffers = [np.empty(max(nbytes, ALIGN), np.uint8) for _ in range(self.count)]
        n = self._buffers[0].nbytes // np.dtype(dtype).itemsize
        return [b.view(dtype)[:n] for b in self._buffers]


def _prefetched(blocks: Iterator[np.ndarray], depth: int) -> Generator[np.ndarray, None, None]:
    """Iterate ``blocks`` computed in a worker thread, at most ``depth`` ahead (numpy and
    file writes release the GIL, so computing and writing overlap)."""
    q: queue.Queue[Union[np.ndarray, BaseException, object]] = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def offer(item: object) -> bool:
        """Queue ``item`` unless the consumer has stopped (then the queue may stay full)."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for b in blocks:
                if not offer(b):
                    return
            offer(done)
        except BaseException as e:  # handed to the consumer
            offer(e)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, np.ndarray)
            yield item
    finally:
        stop.set()
        worker.join()


# Bytes per write() call. On the benchmark machine's kernel (Linux 6.18, ext4) one write() of 16 MiB into
# a new file took 5-10x the time of the same bytes in 64-256 KiB writes (3 GB: 7-16 s against 0.8-1.0 s,
# rounds alternating; 1 MiB writes were sometimes fast, sometimes 8 s), and sendfile from shared memory
# 1.1-1.4 s: the page cache is filled fastest a piece at a time, as cp's kernel copy does.
WRITE_CHUNK = 1 << 18


def write_bytes(f: BinaryIO, data: Union[bytes, memoryview]) -> None:
    """Write ``data`` to ``f`` in pieces of :data:`WRITE_CHUNK` bytes (no copy: memoryview slices)."""
    view = memoryview(data).cast("B")
    for start in range(0, len(view), WRITE_CHUNK):
        f.write(view[start:start + WRITE_CHUNK])


def write_array(f: BinaryIO, value: np.ndarray) -> int:
    """Write ``value``'s bytes (little-endian, C order) to ``f``; return how many."""
    arr = np.ascontiguousarray(value)
    if sys.byteorder != "little":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    write_bytes(f, arr.reshape(-1).view(np.uint8).data)
    return int(arr.nbytes)


def copy_external(t: TensorProto, base_dir: Optional[PathLike], out: BinaryIO) -> int:
    """Copy ``t``'s bytes from its data file (or the model file it was left in) to the end of
    ``out``: in the kernel (``os.copy_file_range``, no copy through this process) where the
    system allows it, else in 16 MiB chunks."""
    info = external_info(t)
    length = int(info["length"]) if info.get("length") else (tensor_nbytes(t) or 0)
    with open_tensor_file(t, base_dir) as src:
        offset = external_offset(t)
        left = _kernel_copy(src, offset, out, length)
        src.seek(offset + length - left)
        while left:
            chunk = src.read(min(left, 1 << 24))
            if not chunk:
                raise MalformedModelError(f"external data of tensor '{t.name}' ends early")
            write_bytes(out, chunk)
            left -= len(chunk)
    return length


def _kernel_copy(src: BinaryIO, offset: int, out: BinaryIO, length: int) -> int:
    """Copy up to ``length`` bytes from ``src`` at ``offset`` to ``out``'s position with
    ``os.copy_file_range``; return how many are left for the ordinary copy (all of them
    where the call is missing or refused: another file system, an old kernel, a pipe)."""
    copy = getattr(os, "copy_file_range", None)
    if copy is None or length == 0:
        return length
    out.flush()
    dst = out.fileno()
    position = os.lseek(dst, 0, os.SEEK_CUR)
    left = length
    try:
        while left:
            n = copy(src.fileno(), dst, min(left, 1 << 30), offset + length - left, position + length - left)
            if n == 0:  # the source ends early: the ordinary copy reports it
                break
            left -= n
    except OSError:
        pass  # EXDEV, ENOSYS, EINVAL...: the rest goes the ordinary way
    out.seek(position + length - left)  # the file object's position, and the file's, after the copy
    return left
