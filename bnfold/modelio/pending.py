"""Tensor values waiting to be written: the one type the fold, the graph index and the writer share.

A :data:`PendingValue` is one of

- an ``np.ndarray``: the new values, already computed;
- a :class:`ScaledTensor`: ``round(source * factor)`` for a weight in external data, computed
  block by block while the output is written, so a model of many gigabytes is folded with
  a few tensors in memory at a time;
- a function returning the array: computed only if something needs the values.

:func:`as_array` turns any of them into an array; the writer (:mod:`bnfold.modelio.external`,
:mod:`bnfold.modelio.stream`) streams arrays whole and :meth:`ScaledTensor.blocks` block by block.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import onnx
from onnx import TensorProto

from ..errors import MalformedModelError, PathLike
from .tensors import external_offset, external_path, read_tensor


BLOCK_BYTES = 1 << 20  # source bytes per block of a ScaledTensor (see docs/DESIGN.md: 1 MiB stays in cache)


def scale_checked(w: np.ndarray, factor: np.ndarray, dtype: np.dtype, checked: bool = True,
                  out: Optional[np.ndarray] = None) -> np.ndarray:
    """``numerics.scale_round`` of a folded weight. ``checked`` says the fold's range was checked
    when it was planned; when it was not (``fold.fuse_to_write``), an overflow here is
    a :class:`~bnfold.numerics.DeferredOverflow`: the fold's records are wrong, not the writer."""
    from ..numerics import DeferredOverflow, FoldOverflow, scale_round

    try:
        return scale_round(w, factor, dtype, "the folded weight", out=out)
    except FoldOverflow as e:
        if checked:
            raise
        raise DeferredOverflow(str(e)) from e


class ScaledTensor:
    """A folded weight not yet computed: ``round(source * factor)`` in ``dtype``. ``checked``:
    whether the fold was checked to fit ``dtype`` (see :func:`scale_checked`)."""

    def __init__(self, source: TensorProto, base_dir: Optional[PathLike], factor: np.ndarray,
                 dtype: np.dtype, checked: bool = True) -> None:
        self.source, self.base_dir, self.factor, self.dtype = source, base_dir, factor, np.dtype(dtype)
        self.checked = checked
        self.shape = tuple(source.dims)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize

    def materialize(self) -> np.ndarray:
        return scale_checked(read_tensor(self.source, self.base_dir), self.factor, self.dtype, self.checked)

    def block_rows(self, block_bytes: Optional[int] = None) -> int:
        """Leading-axis rows per block of :meth:`blocks`."""
        if not self.shape:
            return 1
        src_dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.source.data_type))
        row = int(np.prod(self.shape[1:]))
        return max(1, min((block_bytes or BLOCK_BYTES) // max(1, row * src_dtype.itemsize), self.shape[0]))

    def block_nbytes(self, block_bytes: Optional[int] = None) -> int:
        """Bytes of the largest block :meth:`blocks` yields (the size its ``outs`` need)."""
        return self.block_rows(block_bytes) * int(np.prod(self.shape[1:])) * self.dtype.itemsize if self.shape \
            else self.nbytes

    def blocks(self, block_bytes: Optional[int] = None, outs: Sequence[np.ndarray] = ()) -> Iterator[np.ndarray]:
        """The folded values, a block of leading-axis rows at a time, read into one reused buffer
        (not a memory map: a data file cut short while it is read must give an error, not SIGBUS).

        With ``outs`` (flat arrays of ``dtype``, each of at least a block's size) the blocks are
        computed into them in turn, so a block stays valid until ``len(outs) - 1`` more have been
        produced: a writer that keeps at most that many in flight touches the same memory
        throughout, where fresh arrays cost a page fault and a zeroed page per 4 KiB (a quarter of
        a 3 GB fold's time)."""
        shape = self.shape
        if len(shape) == 0 or 0 in shape:
            yield self.materialize()
            return
        src_dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.source.data_type))
        row = int(np.prod(shape[1:]))
        rows = self.block_rows(block_bytes)
        per_row = self.factor.ndim == len(shape) and self.factor.shape[0] != 1
        buf = np.empty(rows * row, src_dtype)
        with open(external_path(self.source, self.base_dir), "rb") as f:
            f.seek(external_offset(self.source))
            for k, i in enumerate(range(0, shape[0], rows)):
                n = min(rows, shape[0] - i)
                view = buf[:n * row]
                if f.readinto(view.data.cast("B")) != view.nbytes:
                    raise MalformedModelError(f"external data of tensor '{self.source.name}' ends early")
                f_block = self.factor[i:i + n] if per_row else self.factor
                block_shape = (n,) + tuple(shape[1:])
                out = outs[k % len(outs)][:n * row].reshape(block_shape) if outs else None
                yield scale_checked(view.reshape(block_shape), f_block, self.dtype, self.checked, out=out)


PendingValue = Union[np.ndarray, ScaledTensor, Callable[[], np.ndarray]]
"""A tensor value waiting to be written (see the module docstring)."""


def as_array(value: PendingValue) -> np.ndarray:
    """The values of a pending tensor, computed now if they were not yet."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, ScaledTensor):
        return value.materialize()
    return value()


def resolved(value: PendingValue) -> Union[np.ndarray, ScaledTensor]:
    """``value`` with a deferred function called: what the writer streams (arrays whole,
    :class:`ScaledTensor` block by block)."""
    return value if isinstance(value, (np.ndarray, ScaledTensor)) else value()
