"""Host rules: the only place that knows the linear ops a BatchNormalization folds into.

One :class:`HostRule` per op carries everything particular to it, in both
directions (in the spirit of onnxscript's rewriter rules: the shared checks live
once in :mod:`bnfold.fold`, each rule overrides hooks):

- its weight and bias input slots, its output-channel count and the weight axis
  the BN's channels run along (:meth:`HostRule.weight_factor`);
- where its output features are (:meth:`HostRule.feature_axis`, :meth:`HostRule.output_rank`),
  which the fold driver tracks through layout ops to BN's axis 1;
- how a folded bias is materialised (its bias slot, or a following ``Add``);
- extra checks; and, for hosts a BN *before* them can fold into, the forward fold.

Backward (``host -> BN``), ``W' = W * s`` along the output-channel axis, ``b' = b * s + t``:

- Conv: weight ``[C_out, C_in/group, k...]``, output channels on axis 0.
- ConvTranspose: weight ``[C_in, C_out/group, k...]``; channel ``g*(C_out/group)+j``
  is column ``j`` of group ``g``'s rows.
- Gemm: ``alpha * A' @ B' + beta * C``; ``B`` is ``[K, N]`` (transB=0) or
  ``[N, K]`` (transB=1); the new ``C`` is ``beta * C * s + t`` and beta becomes 1.
- MatMul: weight ``B`` ``[..., K, N]``, features on the last axis; its bias is a
  following ``Add`` with a constant (created when absent).

Forward (``BN -> host``), exact because the host sees every shifted input value
exactly once per output: Conv without padding, and Gemm (transA=0).

Adding a host: see CONTRIBUTING.md. :data:`RULES` drives the fold, ``insert``'s
default op set and channel counts, and the CLI help.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from .reasons import Reason, Refusal

if TYPE_CHECKING:
    import numpy as np
    from onnx import NodeProto

    from .graph import ModelIndex, Scope

# This module stays import-light (numpy and onnx are imported where a rule runs), so
# that the CLI's help can list the hosts without paying for onnx.


def attr(node: "NodeProto", name: str, default=None):
    """The value of attribute ``name`` of ``node`` or ``default`` (:func:`bnfold.graph.attr`)."""
    from .graph import attr as get

    return get(node, name, default)


def _np():
    import numpy

    return numpy


def _numerics():
    from . import numerics

    return numerics


__all__ = ["HostRule", "RULES", "CONV", "backward_rule", "forward_rule", "ACTIVATIONS", "LAYOUT_OPS",
           "PASS_THROUGH", "Refusal"]


def name_base(node: NodeProto) -> str:
    """Prefix for tensors generated for ``node``: its name, else its output's."""
    return node.name or node.output[0]


class HostRule:
    """Base rule: an op with weight in input 1 and bias in input 2, features on output axis 1."""

    op_type = ""
    weight_slot = 1
    bias_slot: Optional[int] = 2
    folds_forward = False
    """Whether a BN *before* the op (feeding its input 0) can fold into it."""
    flat_input = False
    """Whether the op reads ``[N, K]`` features: a BN before it may sit behind a Flatten from axis 1."""

    # -- backward: host -> BN -------------------------------------------------------
    def check(self, scope: Scope, node: NodeProto) -> Optional[Refusal]:
        """Extra conditions for folding a following BN; None when they hold."""
        return None

    def out_channels(self, node: NodeProto, w: np.ndarray) -> int:
        """How many output features the op has, given its weight."""
        return w.shape[0]

    def output_rank(self, index: ModelIndex, node: NodeProto, w: np.ndarray) -> Optional[int]:
        """The rank of the op's output, or None when it cannot be known."""
        return w.ndim

    def feature_axis(self, node: NodeProto, w: np.ndarray) -> int:
        """The output axis holding the op's features (negative counts from the end)."""
        return 1

    def weight_factor(self, node: NodeProto, w: np.ndarray, s: np.ndarray) -> np.ndarray:
        """What to multiply the weight by (broadcasting) to scale output channel ``c`` by ``s[c]``."""
        return _numerics().axis_factor(s, 0, w.ndim)

    def effective_bias(self, node: NodeProto, c: Optional[np.ndarray]) -> Optional[np.ndarray]:
        """The bias the op adds, in float64, given the stored bias tensor (or None)."""
        return None if c is None else _np().asarray(c, dtype=_np().float64)

    def write_bias(self, scope: Scope, node: NodeProto, bias: np.ndarray, chain: List[NodeProto]) -> None:
        """Make the op add ``bias`` (already rounded) instead of its own, in either direction;
        ``chain`` (host .. last node before the BN) gains any node this creates, right after
        the host. Also the place for attribute changes the new bias needs."""
        assert self.bias_slot is not None
        scope.write_constant(node, self.bias_slot, bias, f"{name_base(node)}_bias_bnfold")

    # -- forward: BN -> host --------------------------------------------------------
    def forward_check(self, scope: Scope, node: NodeProto, w: np.ndarray) -> Optional[Refusal]:
        """Extra conditions for folding a BN before the op; None when they hold."""
        return None

    def in_channels(self, node: NodeProto, w: np.ndarray) -> int:
        """How many input features the op reads (the BN's channels, or C*H*W behind a Flatten)."""
        raise NotImplementedError

    def forward_fold(self, node: NodeProto, w: np.ndarray, bias: Optional[np.ndarray], s: np.ndarray,
                     t: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """``(factor, b')`` such that ``op(s * x + t) == op'(x)`` with ``W' = W * factor``
        (broadcasting) and ``b'`` in float64."""
        raise NotImplementedError


def _group_check(scope: Scope, node: NodeProto) -> Optional[Refusal]:
    from .graph import Constant

    group = attr(node, "group", 1)
    w = scope.index.resolve(scope, node.input[1]) if len(node.input) > 1 else None
    dims = w.value.shape if isinstance(w, Constant) else None
    if not isinstance(group, int) or group < 1 or (dims and dims[0] % group):
        return Refusal(Reason.UNSUPPORTED_HOST, f"{node.op_type} '{scope.label_of(node)}' has group={group}, "
                                                "which does not divide its weight")
    return None


def conv_pads_input(node: NodeProto, kernel_shape) -> bool:
    """True when the Conv reads padding (where a BN shift would not be applied)."""
    auto_pad = attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad == "VALID":
        return False
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return any(k != 1 for k in kernel_shape)  # a 1-wide kernel never needs padding
    return any(p != 0 for p in attr(node, "pads", []) or [])


class ConvRule(HostRule):
    op_type = "Conv"
    folds_forward = True

    def forward_check(self, scope, node, w):
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

    def forward_fold(self, node, w, bias, s, t):
        group = int(attr(node, "group", 1))
        shift = _numerics().conv_input_shift(w, t, group)
        b_new = shift if bias is None else _np().asarray(bias, dtype=_np().float64) + shift
        return _numerics().conv_input_factor(s, w.shape, group), b_new


class ConvTransposeRule(HostRule):
    op_type = "ConvTranspose"

    def check(self, scope, node):
        return _group_check(scope, node)

    def out_channels(self, node, w):
        return w.shape[1] * int(attr(node, "group", 1))

    def weight_factor(self, node, w, s):
        return _numerics().conv_transpose_factor(s, w.shape, int(attr(node, "group", 1)))


def _gemm_bias_rewritten(scope: Scope, node: NodeProto) -> None:
    """The new C already includes beta; Gemm-6 and older broadcast C only when told to."""
    from .graph import set_attr

    set_attr(node, "beta", 1.0)
    if scope.opset < 7:
        set_attr(node, "broadcast", 1)


class GemmRule(HostRule):
    op_type = "Gemm"
    folds_forward = True
    flat_input = True

    def out_channels(self, node, w):
        return w.shape[0] if attr(node, "transB", 0) else w.shape[1]

    def output_rank(self, index, node, w):
        return 2

    def weight_factor(self, node, w, s):
        return _numerics().axis_factor(s, 0 if attr(node, "transB", 0) else 1, w.ndim)

    def effective_bias(self, node, c):
        if c is None:
            return None
        return float(attr(node, "beta", 1.0)) * _np().asarray(c, dtype=_np().float64)

    def write_bias(self, scope, node, bias, chain):
        super().write_bias(scope, node, bias, chain)
        _gemm_bias_rewritten(scope, node)

    def forward_check(self, scope, node, w):
        if attr(node, "transA", 0):
            return Refusal(Reason.CHANNEL_AXIS_MISMATCH,
                           f"the following Gemm '{scope.label_of(node)}' transposes its input (transA=1)")
        return None

    def in_channels(self, node, w):
        return w.shape[1] if attr(node, "transB", 0) else w.shape[0]

    def forward_fold(self, node, w, bias, s, t):
        trans_b = attr(node, "transB", 0)
        alpha = float(attr(node, "alpha", 1.0))
        beta = float(attr(node, "beta", 1.0))
        w64 = _np().asarray(w, dtype=_np().float64)
        b_kn = w64.T if trans_b else w64  # [K, N]
        shift = alpha * (t @ b_kn)
        b_new = shift if bias is None else beta * _np().asarray(bias, dtype=_np().float64) + shift
        return _numerics().axis_factor(s, 1 if trans_b else 0, w64.ndim), b_new


class MatMulRule(HostRule):
    op_type = "MatMul"
    bias_slot = None  # the bias is a following Add
    folds_forward = True
    flat_input = True

    def out_channels(self, node, w):
        return w.shape[-1]

    def output_rank(self, index, node, w):
        rank = index.rank(node.output[0])
        if rank is None:
            ranks = [index.rank(node.input[0]), w.ndim]
            rank = None if None in ranks else max(ranks)
        return rank

    def feature_axis(self, node, w):
        return -1

    def weight_factor(self, node, w, s):
        return _numerics().axis_factor(s, -1, w.ndim)

    def write_bias(self, scope, node, bias, chain):
        label = name_base(node)
        out = node.output[0]
        scope.rename_output(node, 0, scope.index.fresh_name(f"{out}_matmul"))
        from onnx import helper

        add = helper.make_node("Add", [node.output[0], ""], [out], name=scope.index.fresh_name(f"{label}_bias_add"))
        if scope.opset < 7:
            add.attribute.append(helper.make_attribute("broadcast", 1))  # Add-6 broadcasts only when told to
        scope.add_node_after(node, add)
        scope.write_constant(add, 1, bias, f"{label}_bias_bnfold")
        chain.insert(1, add)

    def forward_check(self, scope, node, w):
        # x @ W contracts x's last axis: BN's channels (axis 1) are that axis only in 2-D
        rank = scope.index.rank(node.input[0])
        if rank != 2 or w.ndim != 2:
            return Refusal(Reason.CHANNEL_AXIS_MISMATCH,
                           f"the following MatMul '{scope.label_of(node)}' reads a {rank or 'unknown'}-D input "
                           f"with a {w.ndim}-D weight; only [N, C] @ [C, M] contracts BN's channel axis")
        return None

    def in_channels(self, node, w):
        return w.shape[0]

    def forward_fold(self, node, w, bias, s, t):
        return _numerics().axis_factor(s, 0, 2), t @ _np().asarray(w, dtype=_np().float64)


CONV = ConvRule()
RULES: Dict[str, HostRule] = {r.op_type: r for r in (CONV, ConvTransposeRule(), GemmRule(), MatMulRule())}
"""Every host op, by op type: the fold, ``insert`` and the CLI help read this table."""


def backward_rule(node: Optional[NodeProto]) -> Optional[HostRule]:
    """The rule for folding a BN after ``node`` into it, if ``node`` is a host."""
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    return RULES.get(node.op_type)


def forward_rule(node: Optional[NodeProto]) -> Optional[HostRule]:
    """The rule for folding a BN before ``node`` into it, if it can take one."""
    rule = backward_rule(node)
    return rule if rule is not None and rule.folds_forward else None


def host_names(forward: bool = False) -> List[str]:
    """Host op types in table order (only forward ones when ``forward``)."""
    return [k for k, r in RULES.items() if r.folds_forward or not forward]


# Element-wise non-linearities: a BN after one of these never folds across it.
ACTIVATIONS = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "Tanh", "Clip", "HardSwish", "Elu", "Selu",
    "Celu", "Gelu", "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Swish", "Exp", "Abs", "Sqrt", "Erf",
})
# Ops that only move data around: they may hide the channel axis.
LAYOUT_OPS = frozenset({"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze"})
# Ops that pass values through unchanged at inference (Cast only to the same type, checked by the driver).
PASS_THROUGH = frozenset({"Identity", "Dropout", "Cast"})
