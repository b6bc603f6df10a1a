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
from typing import Dict, List, Optional, Tuple

import numpy as np
from onnx import NodeProto, helper

from . import numerics
from .hosts import CONV
from .graph import Constant, ModelIndex, Scope, attr, has_attribute_refs, is_default_domain


@dataclass
class Merge:
    """One block collapsed into a single Conv."""

    conv: str
    graph: str
    branches: List[str]
    absorbed_bns: List[NodeProto] = field(default_factory=list)


@dataclass
class _Branch:
    node: Optional[NodeProto]  # Conv, BatchNormalization, or None for a plain identity
    weight: Optional[np.ndarray] = None
    bias: Optional[np.ndarray] = None
    s: Optional[np.ndarray] = None
    t: Optional[np.ndarray] = None


def reparameterize(index: ModelIndex, bn_affine) -> List[Merge]:
    """Collapse every exact multi-branch block of every scope; return what was merged.

    ``bn_affine(scope, bn)`` gives a BN's ``(s, t)`` or a refusal (from the fold driver).
    """
    merges = []
    for scope in index.scopes:
        for node in list(scope.nodes):
            if id(node) in scope.removed or not _is_add(node) or _parent_add(scope, node) is not None:
                continue
            merge = _try_merge(scope, node, bn_affine)
            if merge is not None:
                merges.append(merge)
    return merges


def _is_add(node: NodeProto) -> bool:
    return node.op_type == "Add" and is_default_domain(node) and len(node.input) == 2


def _parent_add(scope: Scope, node: NodeProto) -> Optional[NodeProto]:
    user = scope.only_consumer(node.output[0])
    return user if user is not None and _is_add(user) else None


def _leaves(scope: Scope, root: NodeProto) -> Tuple[List[str], List[NodeProto]]:
    """Tensors summed by the Add tree under ``root``, and the tree's Add nodes."""
    leaves, adds, todo = [], [], [root]
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


def _try_merge(scope: Scope, root: NodeProto, bn_affine) -> Optional[Merge]:
    leaves, adds = _leaves(scope, root)
    if len(set(leaves)) != len(leaves):
        return None
    branches: List[_Branch] = []
    consts: List[np.ndarray] = []
    x = None
    for leaf in leaves:
        c = scope.index.resolve(scope, leaf)
        if isinstance(c, Constant):  # e.g. MobileOne's "out = 0" before its first branch
            consts.append(c.value.astype(np.float64))
            continue
        p = scope.producer.get(leaf)
        if p is not None and scope.only_consumer(leaf) is None:
            return None
        if p is not None and p.op_type == CONV.op_type and is_default_domain(p) and not has_attribute_refs(p):
            src, b = _conv_branch(scope, p)
        elif p is not None and p.op_type == "BatchNormalization" and is_default_domain(p):
            affine = bn_affine(scope, p)
            if not isinstance(affine, tuple):
                return None
            src, b = p.input[0], _Branch(p, s=affine[0], t=affine[1])
        else:
            src, b = leaf, _Branch(None)  # the input itself: an identity branch
        if b is None or (x is not None and src != x):
            return None
        x = src
        branches.append(b)
    convs = [b for b in branches if b.node is not None and b.node.op_type == CONV.op_type]
    if not convs or len(branches) < 2:
        return None
    plan = _plan(convs, branches)
    if plan is None:
        return None
    weight, bias, attrs = plan
    rank = weight.ndim - 2
    for c in consts:  # a constant added to the sum is a bias if it is per channel or scalar
        core = c.shape
        while core and core[0] == 1:
            core = core[1:]
        if core not in ((), (bias.shape[0],) + (1,) * rank) or c.ndim > rank + 2:
            return None
        bias = bias + c.reshape(-1) if core else bias + float(c.reshape(-1)[0])
    try:
        dtype = convs[0].weight.dtype
        w_new = numerics.round_to(weight, dtype, "the merged weight")
        b_new = numerics.round_to(bias, dtype, "the merged bias")
    except numerics.FoldOverflow:
        return None
    return _apply(scope, root, adds, branches, x, w_new, b_new, attrs)


def _conv_branch(scope: Scope, conv: NodeProto) -> Tuple[str, Optional[_Branch]]:
    w = scope.index.resolve(scope, conv.input[1]) if len(conv.input) > 1 else None
    if not isinstance(w, Constant) or attr(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return conv.input[0], None
    bias = None
    if len(conv.input) > 2 and conv.input[2]:
        c = scope.index.resolve(scope, conv.input[2])
        if not isinstance(c, Constant):
            return conv.input[0], None
        bias = c.value.astype(np.float64)
    return conv.input[0], _Branch(conv, weight=w.value, bias=bias)


def _plan(convs: List[_Branch], branches: List[_Branch]):
    """The merged weight, bias (float64) and Conv attributes, or None when inexact."""
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
            return None
    kernel = [max(b.weight.shape[2 + i] for b in convs) for i in range(rank)]
    big = next(b for b in convs if list(b.weight.shape[2:]) == kernel)
    pads = list(attr(big.node, "pads", [0] * 2 * rank))
    weight = np.zeros((c_out, c_in_g) + tuple(kernel))
    bias = np.zeros(c_out)
    for b in convs:
        k = b.weight.shape[2:]
        off = [(kernel[i] - k[i]) // 2 for i in range(rank)]
        if any((kernel[i] - k[i]) % 2 for i in range(rank)):
            return None
        want = [pads[i] - off[i] for i in range(rank)] + [pads[rank + i] - off[i] for i in range(rank)]
        if list(attr(b.node, "pads", [0] * 2 * rank)) != want:
            return None
        region = (slice(None), slice(None)) + tuple(slice(o, o + k[i]) for i, o in enumerate(off))
        weight[region] += b.weight.astype(np.float64)
        if b.bias is not None:
            bias += b.bias
    identities = [b for b in branches if b.node is None or b.node.op_type == "BatchNormalization"]
    if identities:
        same_size = all(pads[i] == pads[rank + i] == (kernel[i] - 1) // 2 and kernel[i] % 2 for i in range(rank))
        if any(s != 1 for s in strides) or c_out != c_in_g * group or not same_size:
            return None
        centre = tuple(k // 2 for k in kernel)
        for b in identities:
            s = np.ones(c_out) if b.node is None else b.s
            t = np.zeros(c_out) if b.node is None else b.t
            if s.shape[0] != c_out:
                return None
            for o in range(c_out):
                weight[(o, o % c_in_g) + centre] += s[o]
            bias += t
    attrs = {"kernel_shape": kernel, "strides": strides, "pads": pads, "group": group}
    return weight, bias, attrs


def _apply(scope: Scope, root: NodeProto, adds: List[NodeProto], branches: List[_Branch], x: str,
           weight: np.ndarray, bias: np.ndarray, attrs: Dict) -> Merge:
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
