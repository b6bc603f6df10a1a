"""The feature axis tracked through layout ops (Transpose/Reshape/Flatten/Squeeze/Unsqueeze) and
value-preserving ops (Identity, inference Dropout, same-type Cast) between a host and its BN."""
from __future__ import annotations

import numpy as np
import pytest

from bnfold import Reason, fuse
from conftest import bn_params, build, check, folds_completely, rand

HEAD = '<ir_version: 8, opset_import: ["" : 15]>'


def kept(model, reason, valid=True):
    if valid:
        check(model)
    result = fuse(model)
    assert [r.reason for r in result.kept] == [reason], [r.detail for r in result.records]
    return result.kept[0]


def test_bn1d_over_tokens_transposed_and_back():
    """PyTorch bn(x.transpose(1, 2)).transpose(1, 2) after a Linear."""
    model = build(f"""{HEAD}
    g (float[N,7,5] x) => (float[N,7,6] y) {{
        c = MatMul (x, W)
        t = Transpose <perm = [0, 2, 1]> (c)
        z = BatchNormalization (t, s, b, m, v)
        y = Transpose <perm = [0, 2, 1]> (z)
    }}""", W=rand(5, 6), **bn_params(6))
    result = folds_completely(model)
    assert result.records[0].host_op == "MatMul"


def test_linear_reshaped_to_an_image_and_transposed():
    """MatMul [B, C] -> Reshape(-1, 1, 1, C) -> Transpose(0, 3, 1, 2) -> BN (ONNX Runtime folds it)."""
    model = build(f"""{HEAD}
    g (float[N,5] x) => (float[N,6,1,1] y) {{
        c = MatMul (x, W)
        r = Reshape (c, shape)
        t = Transpose <perm = [0, 3, 1, 2]> (r)
        y = BatchNormalization (t, s, b, m, v)
    }}""", W=rand(5, 6), shape=np.array([-1, 1, 1, 6], np.int64), **bn_params(6))
    folds_completely(model)


def test_gemm_unsqueezed_to_an_image():
    model = build(f"""{HEAD}
    g (float[N,5] x) => (float[N,6,1,1] y) {{
        c = Gemm <transB = 1> (x, W, C)
        u = Unsqueeze (c, axes)
        y = BatchNormalization (u, s, b, m, v)
    }}""", W=rand(6, 5), C=rand(6, seed=4), axes=np.array([2, 3], np.int64), **bn_params(6))
    folds_completely(model)


@pytest.mark.parametrize("layout", ["f = Flatten <axis = 1> (c)", "f = Squeeze (c, axes)"])
def test_conv_1x1_map_flattened_into_bn1d(layout):
    model = build(f"""{HEAD}
    g (float[N,4,3,3] x) => (float[N,6] y) {{
        c = Conv (x, W, B)
        {layout}
        y = BatchNormalization (f, s, b, m, v)
    }}""", W=rand(6, 4, 3, 3), B=rand(6, seed=5), axes=np.array([2, 3], np.int64), **bn_params(6))
    folds_completely(model)


def test_matmul_bias_add_then_transpose():
    model = build(f"""{HEAD}
    g (float[N,7,5] x) => (float[N,6,7] y) {{
        c = MatMul (x, W)
        a = Add (c, B)
        t = Transpose <perm = [0, 2, 1]> (a)
        y = BatchNormalization (t, s, b, m, v)
    }}""", W=rand(5, 6), B=rand(6, seed=5), **bn_params(6))
    folds_completely(model)


@pytest.mark.parametrize("between", [
    "d = Identity (c)",
    "d = Dropout (c)",
    "d = Dropout (c, ratio, off)",
    "d = Cast <to = 1> (c)",
])
def test_value_preserving_ops_between_host_and_bn(between):
    model = build(f"""{HEAD}
    g (float[N,5] x) => (float[N,6] y) {{
        c = MatMul (x, W)
        {between}
        y = BatchNormalization (d, s, b, m, v)
    }}""", W=rand(5, 6), ratio=np.array(0.5, np.float32), off=np.array(False), **bn_params(6))
    folds_completely(model)


def test_identity_between_conv_and_bn():
    model = build(f"""{HEAD}
    g (float[N,4,6,6] x) => (float[N,4,6,6] y) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, W)
        d = Identity (c)
        y = BatchNormalization (d, s, b, m, v)
    }}""", W=rand(4, 4, 3, 3), **bn_params(4))
    folds_completely(model)


# -- near misses --------------------------------------------------------------------------

def test_reshape_that_splits_the_features():
    model = build(f"""{HEAD}
    g (float[N,5] x) => (float[N,2,3] y) {{
        c = MatMul (x, W)
        r = Reshape (c, shape)
        y = BatchNormalization (r, s, b, m, v)
    }}""", W=rand(5, 6), shape=np.array([-1, 2, 3], np.int64), **bn_params(2))
    rec = kept(model, Reason.CHANNEL_AXIS_MISMATCH)
    assert "Reshape 'Reshape#1'" in rec.detail


def test_flatten_of_a_spatial_map_of_unknown_size():
    model = build(f"""{HEAD}
    g (float[N,4,H,W] x) => (float[N,?] y) {{
        c = Conv (x, Wc)
        f = Flatten <axis = 1> (c)
        y = BatchNormalization (f, s, b, m, v)
    }}""", Wc=rand(6, 4, 3, 3), **bn_params(6))
    rec = kept(model, Reason.CHANNEL_AXIS_MISMATCH, valid=False)
    assert "Flatten 'Flatten#1'" in rec.detail


def test_transpose_back_and_forth_is_still_features_last():
    model = build(f"""{HEAD}
    g (float[N,6,5] x) => (float[N,6,6] y) {{
        c = MatMul (x, W)
        t = Transpose <perm = [0, 2, 1]> (c)
        u = Transpose <perm = [0, 2, 1]> (t)
        y = BatchNormalization (u, s, b, m, v)
    }}""", W=rand(5, 6), **bn_params(6))
    rec = kept(model, Reason.CHANNEL_AXIS_MISMATCH)
    assert "axis 2" in rec.detail


def test_cast_to_another_type_stops_the_search():
    model = build(f"""{HEAD}
    g (float[N,5] x) => (float16[N,6] y) {{
        c = MatMul (x, W)
        d = Cast <to = 10> (c)
        y = BatchNormalization (d, s, b, m, v)
    }}""", W=rand(5, 6), **bn_params(6, dtype=np.float16))
    kept(model, Reason.NO_HOST)


def test_training_dropout_stops_the_search():
    model = build(f"""{HEAD}
    g (float[N,5] x) => (float[N,6] y) {{
        c = MatMul (x, W)
        d = Dropout (c, ratio, on)
        y = BatchNormalization (d, s, b, m, v)
    }}""", W=rand(5, 6), ratio=np.array(0.5, np.float32), on=np.array(True), **bn_params(6))
    kept(model, Reason.NO_HOST)


def test_identity_output_read_elsewhere():
    model = build(f"""{HEAD}
    g (float[N,5] x) => (float[N,6] y, float[N,6] d) {{
        c = MatMul (x, W)
        d = Identity (c)
        y = BatchNormalization (d, s, b, m, v)
    }}""", W=rand(5, 6), **bn_params(6))
    kept(model, Reason.HOST_OUTPUT_IN_USE)


# -- forward, through a Flatten into a classifier Gemm ----------------------------------------

def head(layout: str, trans_b: int = 1, k: int = 36, **arrays):
    w = rand(5, k) if trans_b else rand(k, 5)
    return build(f"""{HEAD}
    g (float[N,4,6,6] x) => (float[?,5] y) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, Wc)
        r = Relu (c)
        p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (r)
        z = BatchNormalization (p, s, b, m, v)
        {layout}
        y = Gemm <transB = {trans_b}, alpha = 0.5, beta = 2.0> (f, W, C)
    }}""", Wc=rand(4, 4, 3, 3, seed=3), W=w, C=rand(5, seed=4), **bn_params(4), **arrays)


@pytest.mark.parametrize("layout,trans_b", [
    ("f = Flatten <axis = 1> (z)", 1),
    ("f = Flatten <axis = 1> (z)", 0),
    ("f = Reshape (z, flat)", 1),
    ("f = Reshape (z, rows)", 1),
])
def test_bn_flatten_gemm_classifier_head(layout, trans_b):
    """Input feature c*H*W + k of the Gemm reads channel c: scaled by s_c, bias gains W.t over H*W."""
    model = head(layout, trans_b, flat=np.array([0, -1], np.int64), rows=np.array([-1, 36], np.int64))
    result = folds_completely(model)
    assert result.records[0].direction == "into_following" and result.records[0].host_op == "Gemm"


def test_reshape_that_does_not_flatten_from_axis_1_is_kept():
    # [N, 4, 3, 3] -> [2N, 18]: a row holds two channels, not one sample's C*H*W features
    model = head("f = Reshape (z, rows)", k=18, rows=np.array([-1, 18], np.int64))
    rec = kept(model, Reason.CHANNEL_AXIS_MISMATCH)
    assert "Reshape 'Reshape#4'" in rec.detail


def test_flatten_from_another_axis_is_kept():
    model = head("f = Flatten <axis = 2> (z)", k=9)
    rec = kept(model, Reason.CHANNEL_AXIS_MISMATCH, valid=False)
    assert "Flatten 'Flatten#4'" in rec.detail


def test_padded_conv_after_bn_is_the_reason_even_behind_an_activation():
    model = build(f"""{HEAD}
    g (float[N,4,6,6] x) => (float[N,4,6,6] y) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, Wc)
        r = Relu (c)
        z = BatchNormalization (r, s, b, m, v)
        y = Conv <pads = [1, 1, 1, 1]> (z, W)
    }}""", Wc=rand(4, 4, 3, 3, seed=3), W=rand(4, 4, 3, 3), **bn_params(4))
    kept(model, Reason.FOLLOWING_CONV_PADDED)


def test_identity_between_bn_and_following_gemm():
    """LeViT's head: BN -> Identity (a clone) -> Linear."""
    model = build(f"""{HEAD}
    g (float[N,4,6,6] x) => (float[N,5] y) {{
        p = ReduceMean <axes = [2, 3], keepdims = 0> (x)
        z = BatchNormalization (p, s, b, m, v)
        d = Identity (z)
        y = Gemm <transB = 1> (d, W, C)
    }}""", W=rand(5, 4), C=rand(5, seed=4), **bn_params(4))
    result = folds_completely(model)
    assert result.records[0].direction == "into_following"


def test_identity_after_bn_read_elsewhere_stops_the_forward_fold():
    model = build(f"""{HEAD}
    g (float[N,4,6,6] x) => (float[N,5] y, float[N,4] d) {{
        p = ReduceMean <axes = [2, 3], keepdims = 0> (x)
        z = BatchNormalization (p, s, b, m, v)
        d = Identity (z)
        y = Gemm <transB = 1> (d, W, C)
    }}""", W=rand(5, 4), C=rand(5, seed=4), **bn_params(4))
    rec = kept(model, Reason.NO_HOST)
    assert "Identity 'Identity#2'" in rec.detail
