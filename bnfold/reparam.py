"""Multi-branch re-parameterisation: a sum of parallel linear branches -> one Conv.

RepVGG, MobileOne, ACNet and DBB-style blocks train with parallel branches on the
same input and add them up:

    y = Conv_kxk(x) + Conv_1x1(x) + BN(x) [+ more Conv branches, any tree of Adds]

After their BNs are folded every branch is linear in ``x``, so the sum is one Conv
whose weight is the sum of the branch weights (smaller kernels zero-padded to the
largest, centred; a BN-only or plain identity branch as an identity kernel scaled
by the BN) and whose bias is the sum of the biases. Merged only when exact:

- every branch reads the same tensor and feeds nothing but the Add tree;
- all Convs share strides and group count, have unit dilations, and each smaller
  kernel's padding equals the largest kernel's minus half the size difference
  (so all outputs line up);
- identity branches need stride 1, as many output as input channels, and a
  largest kernel padded to keep the spatial size;
- a constant in the sum (scalar or per channel) joins the bias.

Runs inside :func:`bnfold.fold.fuse` (``reparameterize=True``) after the BN folds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
from onnx import NodeProto, helper

from . import numerics
from .graph import Constant, ModelIndex, Scope, attr, has_attribute_refs, is_default_domain
from .hosts import CONV
from .reasons import Reason, Refusal


@dataclass
class Merge:
    """One block collapsed into a single Conv."""

    conv: str
    graph: str
    branches: List[str]
    absorbed_bns: List[NodeProto] = field(default_factory=list)


@dataclass
class _ConvBranch:
    node: NodeProto
    weight: np.ndarray
    bias: Optional[np.ndarray] = None


@dataclass
class _IdentityBranch:
    """The input itself (``node`` None), or scaled per channel by a BN (``node``, ``s``, ``t``)."""

    node: Optional[NodeProto] = None
    s: Optional[np.ndarray] = None
    t: Optional[np.ndarray] = None


_Branch = Union[_ConvBranch, _IdentityBranch]
BNAffine = Callable[[Scope, NodeProto], Union[Tuple[np.ndarray, np.ndarray], Refusal]]
"""The fold driver's ``(s, t)`` of a BN, or why it cannot fold."""


def reparameterize(index: ModelIndex, bn_affine: BNAffine) -> Tuple[List[Merge], List[Refusal]]:
    """Collapse every exact multi-branch block of every scope.

    Returns what was merged, and why each candidate block (two or more branches reading
    one tensor, at least one of them a Conv) was not. ``bn_affine(scope, bn)`` gives a
    BN's ``(s, t)`` or a refusal (from the fold driver).
    """
    merges: List[Merge] = []
    refusals: List[Refusal] = []

    def attempt(scope: Scope, node: NodeProto) -> None:
        outcome = _try_merge(scope, node, bn_affine)
        if isinstance(outcome, Merge):
            merges.append(outcome)
        elif outcome is not None:
            where = "" if scope is index.main else f" in {scope.label}"
            refusals.append(Refusal(outcome.reason, f"Add '{scope.label_of(node)}'{where} not merged: "
                                                     f"{outcome.detail}"))
        else:  # no block as a whole: a sum inside it may be one (RepGhost: (dw Conv + BN) + shortcut)
            for x in node.input:
                p = scope.producer.get(x)
                if p is not None and _is_add(p) and scope.only_consumer(x) is node:
                    attempt(scope, p)

    for scope in index.scopes:
        for node in list(scope.nodes):
            if id(node) in scope.removed or not _is_add(node) or _parent_add(scope, node) is not None:
                continue
            attempt(scope, node)
    return merges, refusals


def _is_add(node: NodeProto) -> bool:
    return node.op_type == "Add" and is_default_domain(node) and len(node.input) == 2


def _is_conv(node: NodeProto) -> bool:
    return node.op_type == CONV.op_type and is_default_domain(node)


def _is_bn(node: NodeProto) -> bool:
    return node.op_type == "BatchNormalization" and is_default_domain(node)


def _parent_add(scope: Scope, node: NodeProto) -> Optional[NodeProto]:
    user = scope.only_consumer(node.output[0])
    return user if user is not None and _is_add(user) else None


def _leaves(scope: Scope, root: NodeProto) -> Tuple[List[str], List[NodeProto]]:
    """Tensors summed by the Add tree under ``root``, and the tree's Add nodes."""
    leaves: List[str] = []
    adds: List[NodeProto] = []
    todo = [root]
    while todo:
        add = todo.pop()
        adds.append(add)
        for x in add.input:
            p = scope.producer.get(x)
            if p is not None and _is_add(p) and scope.only_consumer(x) is add:
                todo.append(p)
            else:
                leaves.append(x)
    return leaves, adds


def _try_merge(scope: Scope, root: NodeProto, bn_affine: BNAffine) -> Union[Merge, Refusal, None]:
    """The merge, why a candidate block cannot merge, or None when it is no candidate."""
    leaves, adds = _leaves(scope, root)
    if len(set(leaves)) != len(leaves):
        return None
    consts: List[np.ndarray] = []
    found: List[Tuple[str, Optional[NodeProto]]] = []  # (leaf, producer) of each branch
    for leaf in leaves:
        c = scope.index.resolve(scope, leaf)
        if isinstance(c, Constant):  # e.g. MobileOne's "out = 0" before its first branch
            consts.append(c.value.astype(np.float64))
        else:
            found.append((leaf, scope.producer.get(leaf)))
    sources = {p.input[0] if p is not None and (_is_conv(p) or _is_bn(p)) else leaf for leaf, p in found}
    if len(found) < 2 or len(sources) != 1 or not any(p is not None and _is_conv(p) for _, p in found):
        return None  # not a block of parallel branches on one input
    x = sources.pop()
    branches: List[_Branch] = []
    for leaf, p in found:
        label = f"{p.op_type} '{scope.label_of(p)}'" if p is not None else f"'{leaf}'"
        if p is not None and scope.only_consumer(leaf) is None:
            return Refusal(Reason.BRANCH_SHARED, f"the output of {label} also feeds other nodes")
        b: Union[_Branch, Refusal]
        if p is not None and _is_conv(p):
            b = _conv_branch(scope, p)
            if isinstance(b, Refusal):
                return b
        elif p is not None and _is_bn(p):
            affine = bn_affine(scope, p)
            if isinstance(affine, Refusal):
                return Refusal(Reason.BRANCH_NOT_LINEAR, f"{label} cannot be folded ({affine.reason}: "
                                                         f"{affine.detail})")
            b = _IdentityBranch(p, s=affine[0], t=affine[1])
        else:
            b = _IdentityBranch()  # the input itself: an identity branch
        branches.append(b)
    convs = [b for b in branches if isinstance(b, _ConvBranch)]
    plan = _plan(scope, convs, branches)
    if isinstance(plan, Refusal):
        return plan
    weight, bias, attrs = plan
    rank = weight.ndim - 2
    for const in consts:  # a constant added to the sum is a bias if it is per channel or scalar
        core = const.shape
        while core and core[0] == 1:
            core = core[1:]
        if core not in ((), (bias.shape[0],) + (1,) * rank) or const.ndim > rank + 2:
            return Refusal(Reason.CHANNEL_AXIS_MISMATCH,
                           f"a constant of shape {list(const.shape)} in the sum is not a per-channel bias")
        bias = bias + const.reshape(-1) if core else bias + float(const.reshape(-1)[0])
    try:
        dtype = convs[0].weight.dtype
        w_new = numerics.round_to(weight, dtype, "the merged weight")
        b_new = numerics.round_to(bias, dtype, "the merged bias")
    except numerics.FoldOverflow as e:
        return Refusal(Reason.OVERFLOW, str(e))
    return _apply(scope, root, adds, branches, x, w_new, b_new, attrs)


def _conv_branch(scope: Scope, conv: NodeProto) -> Union[_ConvBranch, Refusal]:
    label = f"Conv '{scope.label_of(conv)}'"
    if has_attribute_refs(conv):
        return Refusal(Reason.BRANCH_NOT_LINEAR, f"{label} takes attributes from the calling function")
    w = scope.index.resolve(scope, conv.input[1]) if len(conv.input) > 1 else None
    if not isinstance(w, Constant):
        return Refusal(Reason.BRANCH_NOT_LINEAR, f"the weight of {label} is not constant")
    if attr(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return Refusal(Reason.BRANCH_MISMATCH, f"{label} uses auto_pad, whose padding depends on the input size")
    bias = None
    if len(conv.input) > 2 and conv.input[2]:
        c = scope.index.resolve(scope, conv.input[2])
        if not isinstance(c, Constant):
            return Refusal(Reason.BRANCH_NOT_LINEAR, f"the bias of {label} is not constant")
        bias = c.value.astype(np.float64)
    return _ConvBranch(conv, weight=w.value, bias=bias)


def _plan(scope: Scope, convs: List[_ConvBranch], branches: List[_Branch]
          ) -> Union[Tuple[np.ndarray, np.ndarray, Dict[str, Any]], Refusal]:
    """The merged weight, bias (float64) and Conv attributes, or why the merge is inexact."""
    first = convs[0].node
    rank = convs[0].weight.ndim - 2
    strides = list(attr(first, "strides", [1] * rank))
    group = int(attr(first, "group", 1))
    c_out = convs[0].weight.shape[0]
    c_in_g = convs[0].weight.shape[1]
    dtype = convs[0].weight.dtype
    for b in convs:
        n = b.node
        if (b.weight.ndim != rank + 2 or list(attr(n, "strides", [1] * rank)) != strides
                or int(attr(n, "group", 1)) != group or any(d != 1 for d in attr(n, "dilations", [1] * rank))
                or b.weight.shape[:2] != (c_out, c_in_g) or b.weight.dtype != dtype):
            return Refusal(Reason.BRANCH_MISMATCH,
                           f"Conv '{scope.label_of(n)}' differs from Conv '{scope.label_of(first)}' in strides, "
                           "groups, dilations, channels or dtype")
    kernel = [max(b.weight.shape[2 + i] for b in convs) for i in range(rank)]
    big = next(b for b in convs if list(b.weight.shape[2:]) == kernel)
    pads = list(attr(big.node, "pads", [0] * 2 * rank))
    weight = np.zeros((c_out, c_in_g) + tuple(kernel))
    bias = np.zeros(c_out)
    for b in convs:
        k = b.weight.shape[2:]
        off = [(kernel[i] - k[i]) // 2 for i in range(rank)]
        want = [pads[i] - off[i] for i in range(rank)] + [pads[rank + i] - off[i] for i in range(rank)]
        if any((kernel[i] - k[i]) % 2 for i in range(rank)) or list(attr(b.node, "pads", [0] * 2 * rank)) != want:
            return Refusal(Reason.BRANCH_MISMATCH,
                           f"the kernel and padding of Conv '{scope.label_of(b.node)}' do not line its output up "
                           f"with Conv '{scope.label_of(big.node)}'")
        region = (slice(None), slice(None)) + tuple(slice(o, o + k[i]) for i, o in enumerate(off))
        weight[region] += b.weight.astype(np.float64)
        if b.bias is not None:
            bias += b.bias
    identities = [b for b in branches if isinstance(b, _IdentityBranch)]
    if identities:
        same_size = all(pads[i] == pads[rank + i] == (kernel[i] - 1) // 2 and kernel[i] % 2 for i in range(rank))
        if any(s != 1 for s in strides) or c_out != c_in_g * group or not same_size:
            return Refusal(Reason.IDENTITY_BRANCH_INEXACT,
                           "an identity branch needs stride 1, as many output as input channels and a "
                           f"size-keeping kernel (Conv '{scope.label_of(big.node)}')")
        centre = tuple(k // 2 for k in kernel)
        for ib in identities:
            s = np.ones(c_out) if ib.s is None else ib.s
            t = np.zeros(c_out) if ib.t is None else ib.t
            if s.shape[0] != c_out:
                bn = f"BatchNormalization '{scope.label_of(ib.node)}'" if ib.node is not None else "the BN"
                return Refusal(Reason.IDENTITY_BRANCH_INEXACT, f"{bn} has {s.shape[0]} channels, the Convs {c_out}")
            for o in range(c_out):
                weight[(o, o % c_in_g) + centre] += s[o]
            bias += t
    attrs = {"kernel_shape": kernel, "strides": strides, "pads": pads, "group": group}
    return weight, bias, attrs


def _apply(scope: Scope, root: NodeProto, adds: List[NodeProto], branches: List[_Branch], x: str,
           weight: np.ndarray, bias: np.ndarray, attrs: Dict[str, Any]) -> Merge:
    out = root.output[0]
    base = root.name or out
    conv = helper.make_node(CONV.op_type, [x, "", ""], [out], name=scope.index.fresh_name(f"{base}_reparam"), **attrs)
    labels = [f"{b.node.op_type} '{scope.label_of(b.node)}'" if b.node is not None else f"identity '{x}'"
              for b in branches]
    for node in adds + [b.node for b in branches if b.node is not None]:
        scope.remove_node(node)
    scope.add_node_before(root, conv)
    scope.write_constant(conv, 1, weight, f"{base}_weight_reparam")
    scope.write_constant(conv, 2, bias, f"{base}_bias_reparam")
    bns = [b.node for b in branches if b.node is not None and b.node.op_type == "BatchNormalization"]
    return Merge(conv.name, scope.label, labels, bns)
