"""Each host op folds, in each of its forms, into a valid and equivalent model.

The reference is ONNX Runtime (optimisations off) on the unmodified model.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnfold import Reason, fuse
from conftest import assert_equivalent, bn_count, bn_params, build, check, feeds_for, rand

HEAD = '<ir_version: 8, opset_import: ["" : 15]>'


def conv_bn(x_shape, y_shape, w_shape, attrs="", bias=None):
    c = w_shape[0]
    ins = "x, W, B" if bias is not None else "x, W"
    text = f"""{HEAD}
    g (float[{x_shape}] x) => (float[{y_shape}] y) {{
        c = Conv {attrs} ({ins})
        y = BatchNormalization <epsilon = 0.001> (c, s, b, m, v)
    }}"""
    arrays = dict(W=rand(*w_shape), **bn_params(c))
    if bias is not None:
        arrays["B"] = rand(c, seed=3)
    return build(text, **arrays)


CONV_CASES = {
    "1d": ("N,4,10", "N,6,10", (6, 4, 3), "<pads = [1, 1]>", None),
    "2d_bias": ("N,3,8,8", "N,8,8,8", (8, 3, 3, 3), "<pads = [1, 1, 1, 1]>", True),
    "3d": ("N,2,4,4,4", "N,4,4,4,4", (4, 2, 1, 1, 1), "", None),
    "grouped": ("N,8,6,6", "N,12,3,3", (12, 2, 3, 3), "<group = 4, strides = [2, 2], pads = [1, 1, 1, 1]>", True),
    "depthwise": ("N,4,5,5", "N,4,5,5", (4, 1, 3, 3), "<group = 4, pads = [1, 1, 1, 1]>", None),
    "depthwise_x3": ("N,4,5,5", "N,12,5,5", (12, 1, 3, 3), "<group = 4, pads = [1, 1, 1, 1]>", True),
    "same_strided": ("N,3,9,9", "N,5,5,5", (5, 3, 3, 3),
                     '<auto_pad = "SAME_UPPER", strides = [2, 2]>', None),
    "asym_pads_dilated": ("N,3,9,7", "N,5,6,2", (5, 3, 3, 3),
                          "<pads = [0, 1, 1, 0], strides = [1, 2], dilations = [2, 2]>", None),
    "valid": ("N,3,9,7", "N,5,7,5", (5, 3, 3, 3), "<auto_pad = \"VALID\">", True),
}


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_bn_folds(case, fold):
    model = conv_bn(*CONV_CASES[case])
    result, folded = fold(model)
    assert bn_count(folded) == 0
    assert [r.host_op for r in result.records] == ["Conv"]
    assert_equivalent(model, folded)


@pytest.mark.parametrize("group,c_in,c_out,attrs", [
    (1, 4, 6, "<strides = [2, 2], pads = [1, 1, 1, 1], output_padding = [1, 1]>"),
    (2, 4, 6, "<group = 2, strides = [2, 2]>"),
    (4, 8, 12, "<group = 4, strides = [2, 2], pads = [1, 1, 1, 1], output_padding = [1, 1]>"),
    (8, 8, 16, "<group = 8>"),
])
@pytest.mark.parametrize("bias", [False, True])
def test_conv_transpose_bn_folds(group, c_in, c_out, attrs, bias, fold):
    ins = "x, W, B" if bias else "x, W"
    model = build(f"""{HEAD}
    g (float[N,{c_in},5,5] x) => (float[N,{c_out},?,?] y) {{
        c = ConvTranspose {attrs} ({ins})
        y = BatchNormalization (c, s, b, m, v)
    }}""", W=rand(c_in, c_out // group, 3, 3), B=rand(c_out, seed=4), **bn_params(c_out))
    if not bias:
        model.graph.initializer.pop(1)
    result, folded = fold(model)
    assert bn_count(folded) == 0 and result.records[0].host_op == "ConvTranspose"
    assert_equivalent(model, folded)


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (), (6,), (1, 6), (3, 6), (3, 1)])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 0.25), (2.0, 0.0)])
def test_gemm_bn_folds(trans_a, trans_b, c_shape, alpha, beta, fold):
    a_shape = "5,3" if trans_a else "3,5"
    ins = "a, W" if c_shape is None else "a, W, C"
    model = build(f"""{HEAD}
    g (float[{a_shape}] a) => (float[3,6] y) {{
        c = Gemm <transA = {trans_a}, transB = {trans_b}, alpha = {alpha}, beta = {beta}> ({ins})
        y = BatchNormalization (c, s, b, m, v)
    }}""", W=rand(*((6, 5) if trans_b else (5, 6))), **bn_params(6))
    if c_shape is not None:
        model.graph.initializer.append(numpy_helper.from_array(rand(*c_shape, seed=9), "C"))
    result, folded = fold(model)
    assert bn_count(folded) == 0 and result.records[0].host_op == "Gemm"
    assert_equivalent(model, folded)


def test_matmul_bn_folds_with_new_bias_add(fold):
    model = build(f"""{HEAD}
    g (float[N,5] x) => (float[N,6] y) {{
        c = MatMul (x, W)
        y = BatchNormalization (c, s, b, m, v)
    }}""", W=rand(5, 6), **bn_params(6))
    result, folded = fold(model)
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add"]
    assert_equivalent(model, folded)


@pytest.mark.parametrize("bias_shape", [(6,), (1, 6), ()])
@pytest.mark.parametrize("const_first", [False, True])
def test_matmul_add_bn_folds(bias_shape, const_first, fold):
    add = "Add (bias, mm)" if const_first else "Add (mm, bias)"
    model = build(f"""{HEAD}
    g (float[N,5] x) => (float[N,6] y) {{
        mm = MatMul (x, W)
        c = {add}
        y = BatchNormalization (c, s, b, m, v)
    }}""", W=rand(5, 6), bias=rand(*bias_shape, seed=5), **bn_params(6))
    result, folded = fold(model)
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add"]
    assert_equivalent(model, folded)


def test_matmul_reshape_bn_reshape_folds(fold):
    """[B, T, C] -> [B*T, C] -> BN -> [B, T, C], as ViTs with BatchNorm1d export."""
    model = build(f"""{HEAD}
    g (float[N,4,5] x) => (float[N,4,6] y) {{
        mm = MatMul (x, W)
        c = Add (mm, bias)
        flat = Reshape (c, to2d)
        z = BatchNormalization (flat, s, b, m, v)
        y = Reshape (z, to3d)
    }}""", W=rand(5, 6), bias=rand(6, seed=5), to2d=np.array([-1, 6], np.int64),
                  to3d=np.array([-1, 4, 6], np.int64), **bn_params(6))
    result, folded = fold(model)
    assert bn_count(folded) == 0
    assert_equivalent(model, folded)


def test_matmul_flatten_last_axis_bn_folds(fold):
    model = build(f"""{HEAD}
    g (float[N,4,5] x) => (float[?,6] y) {{
        mm = MatMul (x, W)
        flat = Flatten <axis = 2> (mm)
        y = BatchNormalization (flat, s, b, m, v)
    }}""", W=rand(5, 6), **bn_params(6))
    result, folded = fold(model)
    assert bn_count(folded) == 0
    assert_equivalent(model, folded)


@pytest.mark.parametrize("attrs,group,c_out", [("", 1, 6), ('auto_pad = "VALID"', 2, 6),
                                               ("pads = [0, 0, 0, 0], strides = [2, 2]", 4, 8),
                                               ('auto_pad = "SAME_UPPER", kernel_shape = [1, 1]', 1, 6)])
def test_bn_folds_forward_into_unpadded_conv(attrs, group, c_out, fold):
    k = 1 if "kernel_shape" in attrs else 3
    attrs = ", ".join(a for a in (f"group = {group}", attrs) if a)
    model = build(f"""{HEAD}
    g (float[N,4,7,7] x) => (float[N,{c_out},?,?] y) {{
        z = BatchNormalization (x, s, b, m, v)
        y = Conv <{attrs}> (z, W, B)
    }}""", W=rand(c_out, 4 // group, k, k), B=rand(c_out, seed=2), **bn_params(4))
    result, folded = fold(model)
    assert bn_count(folded) == 0
    assert result.records[0].direction == "into_following"
    assert_equivalent(model, folded)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_bn_folds_forward_into_gemm(trans_b, fold):
    model = build(f"""{HEAD}
    g (float[3,5] x) => (float[3,6] y) {{
        z = BatchNormalization (x, s, b, m, v)
        y = Gemm <transB = {trans_b}, alpha = 0.5, beta = 2.0> (z, W, C)
    }}""", W=rand(*((6, 5) if trans_b else (5, 6))), C=rand(6, seed=3), **bn_params(5))
    result, folded = fold(model)
    assert bn_count(folded) == 0
    assert_equivalent(model, folded)


def test_chains_fold_completely(fold):
    p1, p2, p3 = bn_params(4, 1, "a"), bn_params(4, 2, "b"), bn_params(4, 3, "c")
    model = build(f"""{HEAD}
    g (float[N,4,6,6] x) => (float[N,4,6,6] y) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, W)
        d = BatchNormalization (c, as, ab, am, av)
        y = BatchNormalization (d, bs, bb, bm, bv)
    }}""", W=rand(4, 4, 3, 3), **p1, **p2)
    _, folded = fold(model)
    assert bn_count(folded) == 0
    assert_equivalent(model, folded)
    model = build(f"""{HEAD}
    g (float[N,4,6,6] x) => (float[N,4,6,6] y) {{
        d = BatchNormalization (x, as, ab, am, av)
        e = BatchNormalization (d, bs, bb, bm, bv)
        f = BatchNormalization (e, cs, cb, cm, cv)
        y = Conv (f, W)
    }}""", W=rand(4, 4, 1, 1), **p1, **p2, **p3)
    _, folded = fold(model)
    assert bn_count(folded) == 0
    assert_equivalent(model, folded)


def test_if_branch_with_outer_scope_parameters(fold):
    model = build(f"""{HEAD}
    g (bool cond, float[N,4,6,6] x) => (float[N,4,6,6] y) {{
        y = If (cond) <
            then_branch = t () => (float[N,4,6,6] ty) {{
                c = Conv <pads = [1, 1, 1, 1]> (x, W)
                ty = BatchNormalization (c, s, b, m, v)
            }},
            else_branch = e () => (float[N,4,6,6] ey) {{
                ey = Conv <pads = [1, 1, 1, 1]> (x, W)
            }}
        >
    }}""", W=rand(4, 4, 3, 3), **bn_params(4))
    result, folded = fold(model)
    assert bn_count(folded) == 0
    assert "then_branch" in result.records[0].graph
    for cond in (True, False):
        feeds = feeds_for(model)
        feeds["cond"] = np.array(cond)
        assert_equivalent(model, folded, feeds=feeds)


def test_loop_body_folds(fold):
    model = build(f"""{HEAD}
    g (float[N,4,6,6] x) => (float[N,4,6,6] y) {{
        y = Loop (trip, keep, x) <
            body = bd (int64 i, bool k, float[N,4,6,6] h) => (bool ko, float[N,4,6,6] ho) {{
                ko = Identity (k)
                c = Conv <pads = [1, 1, 1, 1]> (h, W)
                ho = BatchNormalization (c, s, b, m, v)
            }}
        >
    }}""", W=rand(4, 4, 3, 3, scale=0.3), trip=np.array(3, np.int64), keep=np.array(True), **bn_params(4))
    _, folded = fold(model)
    assert bn_count(folded) == 0
    assert_equivalent(model, folded)


def test_model_local_function_with_constant_nodes(fold):
    params = bn_params(4)
    consts = [helper.make_node("Constant", [], [k], value=numpy_helper.from_array(v, k)) for k, v in params.items()]
    consts.append(helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(rand(4, 4, 3, 3), "W")))
    body = consts + [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
                     helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"])]
    fn = helper.make_function("local", "ConvBn", ["x"], ["y"], body, [helper.make_opsetid("", 15)])
    graph = helper.make_graph([helper.make_node("ConvBn", ["x"], ["y"], domain="local")], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4, 6, 6])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4, 6, 6])])
    model = helper.make_model(graph, functions=[fn], opset_imports=[helper.make_opsetid("", 15),
                                                                   helper.make_opsetid("local", 1)])
    model.ir_version = 8
    result, folded = fold(model)
    assert bn_count(folded) == 0 and result.records[0].graph == "function local.ConvBn"
    assert not any(n.op_type == "Constant" and n.output[0] in params for n in folded.functions[0].node)
    assert_equivalent(model, folded)


def test_constant_node_weights_in_main_graph(fold):
    params = bn_params(4)
    nodes = [helper.make_node("Constant", [], [k], value=numpy_helper.from_array(v, k)) for k, v in params.items()]
    nodes += [helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(rand(4, 3, 3, 3), "W")),
              helper.make_node("Conv", ["x", "W"], ["c"]),
              helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, ["N", 3, 5, 5])],
                              [helper.make_tensor_value_info("y", 1, ["N", 4, 3, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    _, folded = fold(model)
    assert [n.op_type for n in folded.graph.node] == ["Constant", "Conv"]  # W rewritten in place, BN params gone
    assert_equivalent(model, folded)


def test_ir3_initializers_listed_as_inputs(fold):
    """IR < 4: every initializer is also a graph input; the output must keep that consistent."""
    model = build("""<ir_version: 3, opset_import: ["" : 8]>
    g (float[N,4,6,6] x, float[4,4,3,3] W, float[4] s, float[4] b, float[4] m, float[4] v)
      => (float[N,4,6,6] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, W)
        y = BatchNormalization <spatial = 1> (c, s, b, m, v)
    }""", W=rand(4, 4, 3, 3), **bn_params(4))
    result, folded = fold(model)
    assert bn_count(folded) == 0
    inits = {t.name for t in folded.graph.initializer}
    assert inits <= {v.name for v in folded.graph.input}
    assert_equivalent(model, folded, feeds={"x": rand(2, 4, 6, 6)})


def test_shared_weight_is_copied_not_modified(fold):
    model = build(f"""{HEAD}
    g (float[N,4,6,6] x) => (float[N,4,6,6] y, float[N,4,6,6] z) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, W)
        y = BatchNormalization (c, s, b, m, v)
        z = Conv <pads = [1, 1, 1, 1]> (x, W)
    }}""", W=rand(4, 4, 3, 3), **bn_params(4))
    original_w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    _, folded = fold(model)
    w = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    assert np.array_equal(w["W"], original_w)
    assert folded.graph.node[0].input[1] != "W" and folded.graph.node[1].input[1] == "W"
    assert_equivalent(model, folded)


def test_mixed_precision_bn15_into_float16_conv(fold):
    """BatchNormalization-15: float16 X with float32 parameters -> float16 weights."""
    model = build(f"""{HEAD}
    g (float16[N,4,6,6] x) => (float16[N,8,6,6] y) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, W)
        y = BatchNormalization (c, s, b, m, v)
    }}""", W=rand(8, 4, 3, 3, dtype=np.float16), **bn_params(8))
    _, folded = fold(model)
    assert bn_count(folded) == 0
    assert {t.data_type for t in folded.graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert_equivalent(model, folded, rtol=2e-2, atol_scale=5e-3)


def test_double_weights_fold(fold):
    from onnx.reference import ReferenceEvaluator

    model = conv_bn("N,3,5,5", "N,4,5,5", (4, 3, 3, 3), "<pads = [1, 1, 1, 1]>")
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    model.graph.output[0].type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    _, folded = fold(model)
    x = rand(2, 3, 5, 5, dtype=np.float64)
    ref = ReferenceEvaluator(model).run(None, {"x": x})[0]
    got = ReferenceEvaluator(folded).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10 * np.abs(ref).max())


def test_bfloat16_weights_fold_rounded_once(fold):
    import ml_dtypes

    w = rand(5, 6).astype(ml_dtypes.bfloat16)
    p = bn_params(6)
    model = build(f"""{HEAD}
    g (bfloat16[N,5] x) => (bfloat16[N,6] y) {{
        c = MatMul (x, W)
        y = BatchNormalization (c, s, b, m, v)
    }}""", W=w, **p)
    _, folded = fold(model)
    new_w = numpy_helper.to_array(next(t for t in folded.graph.initializer if list(t.dims) == [5, 6]))
    assert new_w.dtype == ml_dtypes.bfloat16
    p64 = {k: v.astype(np.float64) for k, v in p.items()}
    s = p64["s"] / np.sqrt(p64["v"] + 1e-5)
    expected = w.astype(np.float64) * s
    # rounded once to bfloat16: within half a bfloat16 ulp (2**-8 relative)
    assert np.all(np.abs(new_w.astype(np.float64) - expected) <= np.abs(expected) * 2.0 ** -8)


def test_weight_behind_identity_is_copied_not_rewritten(fold):
    """Exporters route shared parameters through Identity; the shared tensor must stay intact."""
    model = build(f"""{HEAD}
    g (float[N,4,6,6] x) => (float[N,4,6,6] y, float[N,4,6,6] z) {{
        Wi = Identity (W)
        c = Conv <pads = [1, 1, 1, 1]> (x, Wi)
        y = BatchNormalization (c, s, b, m, v)
        z = Conv <pads = [1, 1, 1, 1]> (x, W)
    }}""", W=rand(4, 4, 3, 3), **bn_params(4))
    _, folded = fold(model)
    assert bn_count(folded) == 0
    assert_equivalent(model, folded)
    assert "Identity" not in [n.op_type for n in folded.graph.node]


@pytest.mark.parametrize("pre_transposed", [False, True])
def test_levit_style_linear_bn1d_with_shape_reader(pre_transposed, fold):
    """LeViT exports Linear+BatchNorm1d as MatMul -> Flatten -> BN -> Reshape(Shape(MatMul)),
    with the weight as Transpose(W) when exported without constant folding."""
    weight = "Wt = Transpose <perm = [1, 0]> (W)\n        mm = MatMul (x, Wt)" if not pre_transposed \
        else "mm = MatMul (x, W)"
    model = build(f"""{HEAD}
    g (float[N,4,5] x) => (float[N,4,6] y) {{
        {weight}
        flat = Flatten <axis = 2> (mm)
        z = BatchNormalization (flat, s, b, m, v)
        shape = Shape (mm)
        y = Reshape (z, shape)
    }}""", W=rand(6, 5) if not pre_transposed else rand(5, 6), **bn_params(6))
    _, folded = fold(model)
    assert bn_count(folded) == 0
    assert "Transpose" not in [n.op_type for n in folded.graph.node]
    assert_equivalent(model, folded)


def test_conv_output_shape_reader_is_redirected(fold):
    model = build(f"""{HEAD}
    g (float[N,4,6,6] x) => (float[N,4,6,6] y, int64[4] sh) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, W)
        sh = Shape (c)
        y = BatchNormalization (c, s, b, m, v)
    }}""", W=rand(4, 4, 3, 3), **bn_params(4))
    _, folded = fold(model)
    assert bn_count(folded) == 0
    assert_equivalent(model, folded)


@pytest.mark.parametrize("axis", [1, -3])
def test_bn_after_channel_concat_of_convs_folds_slice_by_slice(axis, fold):
    """MixNet-style: parallel convs with different kernels, concatenated on channels, one BN."""
    model = build(f"""{HEAD}
    g (float[N,4,6,6] x) => (float[N,10,6,6] y) {{
        a = Conv <pads = [1, 1, 1, 1]> (x, Wa)
        b2 = Conv <pads = [2, 2, 2, 2], group = 2> (x, Wb, Bb)
        c = MatMul (x, Wc)
        d = Conv (x, Wd)
        cat = Concat <axis = {axis}> (a, b2, d)
        y = BatchNormalization (cat, s, b, m, v)
    }}""".replace("        c = MatMul (x, Wc)\n", ""),
        Wa=rand(3, 4, 3, 3), Wb=rand(4, 2, 5, 5, seed=2), Bb=rand(4, seed=3),
        Wd=rand(3, 4, 1, 1, seed=4), **bn_params(10))
    result, folded = fold(model)
    assert bn_count(folded) == 0
    assert "Conv 'Conv#0', Conv 'Conv#1', Conv 'Conv#2'" in result.records[0].detail
    assert_equivalent(model, folded)


def test_bn_after_concat_of_gemms_folds(fold):
    model = build(f"""{HEAD}
    g (float[3,5] x) => (float[3,9] y) {{
        a = Gemm <transB = 1> (x, Wa, Ba)
        c = MatMul (x, Wc)
        cat = Concat <axis = 1> (a, c)
        y = BatchNormalization (cat, s, b, m, v)
    }}""", Wa=rand(4, 5), Ba=rand(4, seed=2), Wc=rand(5, 5, seed=3), **bn_params(9))
    _, folded = fold(model)
    assert bn_count(folded) == 0
    assert_equivalent(model, folded)


def test_bn1d_then_matmul_folds_forward():
    """BN on [N, C] -> MatMul [C, M]: W rows scaled by s, bias t @ W in a new Add."""
    model = build(f"""{HEAD}
    g (float[N,5] x) => (float[N,6] y) {{
        z = BatchNormalization (x, s, b, m, v)
        y = MatMul (z, W)
    }}""", W=rand(5, 6), **bn_params(5))
    check(model)
    result = fuse(model)
    check(result.to_model())
    assert [n.op_type for n in result.to_model().graph.node] == ["MatMul", "Add"]
    assert result.records[0].direction == "into_following"
    assert_equivalent(model, result.to_model())


def test_bn_then_matmul_over_another_axis_is_kept():
    """[N, C, L] @ [L, M] contracts L, not BN's channels."""
    model = build(f"""{HEAD}
    g (float[N,5,4] x) => (float[N,5,6] y) {{
        z = BatchNormalization (x, s, b, m, v)
        y = MatMul (z, W)
    }}""", W=rand(4, 6), **bn_params(5))
    result = fuse(model)
    assert [r.reason for r in result.kept] == [Reason.CHANNEL_AXIS_MISMATCH]
    assert "MatMul" in result.kept[0].detail
