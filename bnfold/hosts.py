"""The linear ops a BatchNormalization folds into, one small class each.

A host describes only what is particular to it: where its weight is, along which
weight axis the BN's channels run, where its bias lives and any extra checks.
Checks every fold shares (BN parameters, single consumers, dtypes, overflow) live
in :mod:`bnfold.fuse`.

Backward hosts (``host -> BN``), computing ``W' = W * s`` along the output-channel
axis and ``b' = b * s + t``:

- Conv: weight ``[C_out, C_in/group, k...]``, output channels on axis 0.
- ConvTranspose: weight ``[C_in, C_out/group, k...]``; channel ``g*(C_out/group)+j``
  is column ``j`` of group ``g``'s rows.
- Gemm: ``alpha * A' @ B' + beta * C``; ``B`` is ``[K, N]`` (transB=0) or
  ``[N, K]`` (transB=1); the new ``C`` is ``beta * C * s + t`` and beta becomes 1.
- MatMul: weight ``B`` ``[..., K, N]``, channels on the last axis; its bias is a
  following ``Add`` with a constant (created when absent).

Forward hosts (``BN -> host``), exact because the host sees every shifted input
value exactly once per output: Conv without padding, and Gemm (transA=0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
from onnx import NodeProto

from . import numerics
from .graph import Scope, attr, set_attr
from .reasons import Reason


@dataclass
class Refusal:
    """A fold that does not apply: the reason code and a sentence saying why."""

    reason: Reason
    detail: str


class BackwardHost:
    """Base for ops a BN *after* them folds into."""

    op_type = ""
    weight_index = 1
    bias_index: Optional[int] = 2
    feature_last = False  # channels on the last output axis (Gemm/MatMul) vs axis 1

    def check(self, scope: Scope, node: NodeProto) -> Optional[Refusal]:
        return None

    def out_channels(self, node: NodeProto, w: np.ndarray) -> int:
        return w.shape[0]

    def weight_factor(self, node: NodeProto, w: np.ndarray, s: np.ndarray) -> np.ndarray:
        """What to multiply the weight by (broadcasting) to scale output channel ``c`` by ``s[c]``."""
        return numerics.axis_factor(s, 0, w.ndim)

    def effective_bias(self, node: NodeProto, c: Optional[np.ndarray]) -> Optional[np.ndarray]:
        """The bias the op adds, in float64, given the stored bias tensor (or None)."""
        return None if c is None else np.asarray(c, dtype=np.float64)

    def after_fold(self, scope: Scope, node: NodeProto) -> None:
        """Attribute changes the rewritten bias needs."""


def _group_check(scope: Scope, node: NodeProto) -> Optional[Refusal]:
    group = attr(node, "group", 1)
    w = scope.index.resolve(scope, node.input[1]) if len(node.input) > 1 else None
    dims = getattr(getattr(w, "tensor", None), "dims", None)
    if not isinstance(group, int) or group < 1 or (dims and dims[0] % group):
        return Refusal(Reason.UNSUPPORTED_HOST, f"{node.op_type} '{scope.label_of(node)}' has group={group}, "
                                                "which does not divide its weight")
    return None


class ConvHost(BackwardHost):
    op_type = "Conv"


class ConvTransposeHost(BackwardHost):
    op_type = "ConvTranspose"

    def check(self, scope, node):
        return _group_check(scope, node)

    def out_channels(self, node, w):
        return w.shape[1] * int(attr(node, "group", 1))

    def weight_factor(self, node, w, s):
        return numerics.conv_transpose_factor(s, w.shape, int(attr(node, "group", 1)))


class GemmHost(BackwardHost):
    op_type = "Gemm"
    feature_last = True

    def out_channels(self, node, w):
        return w.shape[0] if attr(node, "transB", 0) else w.shape[1]

    def weight_factor(self, node, w, s):
        return numerics.axis_factor(s, 0 if attr(node, "transB", 0) else 1, w.ndim)

    def effective_bias(self, node, c):
        if c is None:
            return None
        return float(attr(node, "beta", 1.0)) * np.asarray(c, dtype=np.float64)

    def after_fold(self, scope, node):
        gemm_bias_rewritten(scope, node)


def gemm_bias_rewritten(scope: Scope, node: NodeProto) -> None:
    """The new C already includes beta; Gemm-6 and older broadcast C only when told to."""
    set_attr(node, "beta", 1.0)
    if scope.opset < 7:
        set_attr(node, "broadcast", 1)


class MatMulHost(BackwardHost):
    op_type = "MatMul"
    bias_index = None  # the bias is a following Add
    feature_last = True

    def out_channels(self, node, w):
        return w.shape[-1]

    def weight_factor(self, node, w, s):
        return numerics.axis_factor(s, -1, w.ndim)


BACKWARD_HOSTS: Dict[str, BackwardHost] = {h.op_type: h for h in (ConvHost(), ConvTransposeHost(), GemmHost(), MatMulHost())}


class ForwardHost:
    """Base for ops a BN *before* them folds into (the BN feeds their input 0)."""

    op_type = ""

    def check(self, scope: Scope, node: NodeProto, w: np.ndarray) -> Optional[Refusal]:
        return None

    def in_channels(self, node: NodeProto, w: np.ndarray) -> int:
        raise NotImplementedError

    def fold(self, node: NodeProto, w: np.ndarray, bias: Optional[np.ndarray], s: np.ndarray, t: np.ndarray):
        """Return ``(factor, b')`` such that ``op(s * x + t) == op'(x)`` with ``W' = W * factor``
        (broadcasting) and ``b'`` in float64."""
        raise NotImplementedError

    def after_fold(self, scope: Scope, node: NodeProto) -> None:
        pass


def conv_pads_input(node: NodeProto, kernel_shape) -> bool:
    """True when the Conv reads padding (where a BN shift would not be applied)."""
    auto_pad = attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad == "VALID":
        return False
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return any(k != 1 for k in kernel_shape)  # a 1-wide kernel never needs padding
    return any(p != 0 for p in attr(node, "pads", []) or [])


class ConvForward(ForwardHost):
    op_type = "Conv"

    def check(self, scope, node, w):
        refusal = _group_check(scope, node)
        if refusal:
            return refusal
        if conv_pads_input(node, w.shape[2:]):
            return Refusal(Reason.FOLLOWING_CONV_PADDED,
                           f"the following Conv '{scope.label_of(node)}' pads its input, and padded zeros "
                           "would not receive the BN's shift")
        return None

    def in_channels(self, node, w):
        return w.shape[1] * int(attr(node, "group", 1))

    def fold(self, node, w, bias, s, t):
        group = int(attr(node, "group", 1))
        shift = numerics.conv_input_shift(w, t, group)
        b_new = shift if bias is None else np.asarray(bias, dtype=np.float64) + shift
        return numerics.conv_input_factor(s, w.shape, group), b_new


class GemmForward(ForwardHost):
    op_type = "Gemm"

    def check(self, scope, node, w):
        if attr(node, "transA", 0):
            return Refusal(Reason.CHANNEL_AXIS_MISMATCH,
                           f"the following Gemm '{scope.label_of(node)}' transposes its input (transA=1)")
        return None

    def in_channels(self, node, w):
        return w.shape[1] if attr(node, "transB", 0) else w.shape[0]

    def fold(self, node, w, bias, s, t):
        trans_b = attr(node, "transB", 0)
        alpha = float(attr(node, "alpha", 1.0))
        beta = float(attr(node, "beta", 1.0))
        w64 = np.asarray(w, dtype=np.float64)
        b_kn = w64.T if trans_b else w64  # [K, N]
        shift = alpha * (t @ b_kn)
        b_new = shift if bias is None else beta * np.asarray(bias, dtype=np.float64) + shift
        return numerics.axis_factor(s, 1 if trans_b else 0, w64.ndim), b_new

    def after_fold(self, scope, node):
        gemm_bias_rewritten(scope, node)


FORWARD_HOSTS: Dict[str, ForwardHost] = {h.op_type: h for h in (ConvForward(), GemmForward())}

# Element-wise non-linearities: a BN after one of these never folds across it.
ACTIVATIONS = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "Tanh", "Clip", "HardSwish", "Elu", "Selu",
    "Celu", "Gelu", "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Swish", "Exp", "Abs", "Sqrt", "Erf",
})
# Ops that only move data around: they may hide the channel axis.
LAYOUT_OPS = frozenset({"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze"})
