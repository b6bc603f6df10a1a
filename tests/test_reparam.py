"""--reparameterize: sums of parallel linear branches collapse into one exact Conv."""
from __future__ import annotations

import numpy as np
import pytest

from bnfold import Reason, fuse
from conftest import assert_equivalent, bn_count, bn_params, build, check, rand

HEAD = '<ir_version: 8, opset_import: ["" : 15]>'


def p(c, seed, prefix):
    return bn_params(c, seed, prefix)


def repvgg(stride=1, identity=True, c=4):
    ident = """
        i = BatchNormalization (x, is, ib, im, iv)
        y = Add (s2, i)""" if identity else "\n        y = Identity (s2)"
    out_hw = 6 // stride
    return build(f"""{HEAD}
    g (float[N,{c},6,6] x) => (float[N,{c},{out_hw},{out_hw}] y) {{
        a = Conv <pads = [1, 1, 1, 1], strides = [{stride}, {stride}]> (x, Wa)
        an = BatchNormalization (a, as, ab, am, av)
        b1 = Conv <strides = [{stride}, {stride}]> (x, Wb)
        bn1 = BatchNormalization (b1, bs, bb, bm, bv)
        s2 = Add (an, bn1){ident}
    }}""", Wa=rand(c, c, 3, 3), Wb=rand(c, c, 1, 1, seed=2), **p(c, 1, "a"), **p(c, 2, "b"), **p(c, 3, "i"))


@pytest.mark.parametrize("stride,identity", [(1, True), (1, False), (2, False)])
def test_repvgg_block_becomes_one_conv(stride, identity):
    model = repvgg(stride, identity)
    result = fuse(model, reparameterize=True)
    check(result.to_model())
    ops = [n.op_type for n in result.to_model().graph.node]
    assert ops.count("Conv") == 1 and "Add" not in ops and bn_count(result.to_model()) == 0
    assert len(result.merges) == 1
    assert_equivalent(model, result.to_model())
    if identity:
        assert [r.direction for r in result.records][-1] == "reparameterized"


def test_mobileone_depthwise_block_with_constant_start():
    c = 4
    model = build(f"""{HEAD}
    g (float[N,{c},6,6] x) => (float[N,{c},6,6] y) {{
        k0 = Conv <pads = [1, 1, 1, 1], group = {c}> (x, W0)
        k0n = BatchNormalization (k0, as, ab, am, av)
        z = Add (k0n, zero)
        k1 = Conv <pads = [1, 1, 1, 1], group = {c}> (x, W1)
        k1n = BatchNormalization (k1, bs, bb, bm, bv)
        s1 = Add (z, k1n)
        sc = Conv <group = {c}> (x, W2)
        scn = BatchNormalization (sc, cs, cb, cm, cv)
        s2 = Add (s1, scn)
        i = BatchNormalization (x, is, ib, im, iv)
        y = Add (s2, i)
    }}""", W0=rand(c, 1, 3, 3), W1=rand(c, 1, 3, 3, seed=2), W2=rand(c, 1, 1, 1, seed=3),
                  zero=np.array(0.25, np.float32), **p(c, 1, "a"), **p(c, 2, "b"), **p(c, 3, "c"), **p(c, 4, "i"))
    result = fuse(model, reparameterize=True)
    check(result.to_model())
    assert [n.op_type for n in result.to_model().graph.node] == ["Conv"]
    assert_equivalent(model, result.to_model())


def test_repghost_block_inside_a_residual_sum():
    """RepGhost: a depthwise Conv+BN branch plus a BN-only branch on one input, and that sum added
    to the block's shortcut. The whole tree reads two tensors, so it is no block; the inner sum is."""
    c = 4
    model = build(f"""{HEAD}
    g (float[N,{c},6,6] x, float[N,{c},6,6] r) => (float[N,{c},6,6] y) {{
        k = Conv <pads = [1, 1, 1, 1], group = {c}> (x, W)
        kn = BatchNormalization (k, as, ab, am, av)
        f = BatchNormalization (x, fs, fb, fm, fv)
        s = Add (kn, f)
        y = Add (s, r)
    }}""", W=rand(c, 1, 3, 3), **p(c, 1, "a"), **p(c, 2, "f"))
    result = fuse(model, reparameterize=True)
    check(result.to_model())
    assert [n.op_type for n in result.to_model().graph.node] == ["Conv", "Add"]
    assert len(result.merges) == 1 and bn_count(result.to_model()) == 0
    assert_equivalent(model, result.to_model())


def test_acnet_asymmetric_kernels():
    model = build(f"""{HEAD}
    g (float[N,3,7,7] x) => (float[N,5,7,7] y) {{
        a = Conv <pads = [1, 1, 1, 1]> (x, Wa, Ba)
        h = Conv <pads = [0, 1, 0, 1]> (x, Wh)
        v = Conv <pads = [1, 0, 1, 0]> (x, Wv)
        s = Add (a, h)
        y = Add (s, v)
    }}""", Wa=rand(5, 3, 3, 3), Ba=rand(5, seed=7), Wh=rand(5, 3, 1, 3, seed=2), Wv=rand(5, 3, 3, 1, seed=3))
    result = fuse(model, reparameterize=True)
    assert [n.op_type for n in result.to_model().graph.node] == ["Conv"]
    assert_equivalent(model, result.to_model())


@pytest.mark.parametrize("b_line,wb,extra,reason", [
    ("b1 = Conv (x2, Wb)", (4, 4, 1, 1), "", None),  # the branches read different inputs: no candidate
    ("b1 = Conv <pads = [2, 0, 0, 2]> (x, Wb)", (4, 4, 3, 3), "", Reason.BRANCH_MISMATCH),  # shifted window
    ("b1 = Conv (x, Wb)", (4, 4, 1, 1), "e = Relu (an)", Reason.BRANCH_SHARED),  # a branch feeds another node
])
def test_inexact_blocks_are_left_alone(b_line, wb, extra, reason):
    model = build(f"""{HEAD}
    g (float[N,4,6,6] x, float[N,4,6,6] x2) => (float[N,4,6,6] y, float[N,4,6,6] e) {{
        a = Conv <pads = [1, 1, 1, 1]> (x, Wa)
        an = BatchNormalization (a, as, ab, am, av)
        {b_line}
        bn1 = BatchNormalization (b1, bs, bb, bm, bv)
        y = Add (an, bn1)
        {extra or "e = Identity (x2)"}
    }}""", Wa=rand(4, 4, 3, 3), Wb=rand(*wb, seed=2), **p(4, 1, "a"), **p(4, 2, "b"))
    check(model)
    result = fuse(model, reparameterize=True)
    assert not result.merges
    assert [r.reason for r in result.unmerged] == ([reason] if reason else [])
    assert all("Add 'Add#" in r.detail for r in result.unmerged)
    assert_equivalent(model, result.to_model())


def test_identity_branch_with_stride_2_is_not_merged_and_keeps_its_reason():
    model = build(f"""{HEAD}
    g (float[N,4,6,6] x) => (float[N,4,3,3] y, float[N,4,6,6] i) {{
        a = Conv <pads = [1, 1, 1, 1], strides = [2, 2]> (x, Wa)
        y = Relu (a)
        i = BatchNormalization (x, is, ib, im, iv)
    }}""", Wa=rand(4, 4, 3, 3), **p(4, 3, "i"))
    result = fuse(model, reparameterize=True)
    assert not result.merges and result.kept[0].reason == Reason.NO_HOST


def test_reparameterize_is_off_by_default():
    result = fuse(repvgg())
    assert not result.merges and bn_count(result.to_model()) == 1
    assert result.unmerged is None and "not_reparameterized" not in result.to_dict()


def test_identity_branch_of_a_strided_block_is_refused_with_its_reason():
    model = repvgg(stride=2, identity=True)
    model.graph.output[0].type.tensor_type.shape.dim[2].dim_param = "H"  # the sum broadcasts: no fixed shape
    model.graph.output[0].type.tensor_type.shape.dim[3].dim_param = "W"
    result = fuse(model, reparameterize=True)
    assert not result.merges and [r.reason for r in result.unmerged] == [Reason.IDENTITY_BRANCH_INEXACT]
