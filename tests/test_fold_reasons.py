"""Every BN bnfold keeps carries the right reason code, and the model stays intact.

A kept BN must leave the model byte-identical when nothing else folds, so each case
also checks that fuse is a no-op on it.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bnfold import Reason, fuse
from conftest import bn_count, bn_params, build, check, rand

HEAD = '<ir_version: 8, opset_import: ["" : 15]>'


def kept(model, reason, *, valid=True, **kw):
    """Fuse, expect exactly one kept BN with ``reason``; return its record."""
    if valid:
        check(model)
    before = model.SerializeToString()
    result = fuse(model, **kw)
    assert [r.reason for r in result.records if not r.folded] == [reason], [r.detail for r in result.records]
    rec = result.kept[0]
    assert rec.node and rec.node in rec.detail and rec.detail.startswith("BatchNormalization '")
    if not result.folded:
        assert result.to_model().SerializeToString() == before
    if valid:
        check(result.to_model())
    return rec


def conv_then(bn_line, extra="", outputs="float[N,4,6,6] y", **arrays):
    arrays.setdefault("W", rand(4, 4, 3, 3))
    for k, v in bn_params(4).items():
        arrays.setdefault(k, v)
    return build(f"""{HEAD}
    g (float[N,4,6,6] x) => ({outputs}) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, W)
        {bn_line}
        {extra}
    }}""", **arrays)


def test_training_mode_attribute():
    kept(conv_then("y, rm, rv = BatchNormalization <training_mode = 1> (c, s, b, m, v)"), Reason.TRAINING_MODE)
    # extra outputs left unnamed: still training mode by the attribute alone
    kept(conv_then("y = BatchNormalization <training_mode = 1> (c, s, b, m, v)"), Reason.TRAINING_MODE, valid=False)


def test_training_outputs_in_use():
    model = build("""<ir_version: 8, opset_import: ["" : 9]>
    g (float[N,4,6,6] x) => (float[N,4,6,6] y, float[4] rm) {
        c = Conv <pads = [1, 1, 1, 1]> (x, W)
        y, rm, rv, sm, sv = BatchNormalization (c, s, b, m, v)
    }""", W=rand(4, 4, 3, 3), **bn_params(4))
    kept(model, Reason.TRAINING_MODE)


def test_spatial0_per_activation_parameters():
    p = {k: np.broadcast_to(v[:, None, None], (4, 6, 6)).copy() for k, v in bn_params(4).items()}
    model = build("""<ir_version: 3, opset_import: ["" : 7]>
    g (float[N,4,6,6] x) => (float[N,4,6,6] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, W)
        y = BatchNormalization <spatial = 0> (c, s, b, m, v)
    }""", W=rand(4, 4, 3, 3), **p)
    for name in ("W", "s", "b", "m", "v"):  # IR 3: initializers are graph inputs too
        t = next(t for t in model.graph.initializer if t.name == name)
        model.graph.input.append(onnx.helper.make_tensor_value_info(name, t.data_type, t.dims))
    kept(model, Reason.SPATIAL_PER_ACTIVATION)


def test_spatial0_on_2d_input_is_per_channel_and_folds():
    model = build("""<ir_version: 4, opset_import: ["" : 7]>
    g (float[3,5] a) => (float[3,6] y) {
        c = Gemm (a, W, C)
        y = BatchNormalization <spatial = 0> (c, s, b, m, v)
    }""", W=rand(5, 6), C=rand(6), **bn_params(6))
    result = fuse(model)
    assert bn_count(result.to_model()) == 0


def test_parameter_is_graph_input():
    model = build(f"""{HEAD}
    g (float[N,4,6,6] x, float[4] m) => (float[N,4,6,6] y) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, W)
        y = BatchNormalization (c, s, b, m, v)
    }}""", W=rand(4, 4, 3, 3), **{k: v for k, v in bn_params(4).items() if k != "m"})
    rec = kept(model, Reason.NOT_CONSTANT)
    assert "'m' is an input" in rec.detail


def test_parameter_computed_at_runtime():
    # computed from the activations (a parameter computed from constants folds: test_fold_constants.py)
    model = conv_then("m2 = ReduceMean <axes = [0, 2, 3], keepdims = 0> (c)\n        "
                      "y = BatchNormalization (c, s, b, m2, v)", "")
    kept(model, Reason.NOT_CONSTANT)


def test_overridable_initializer_then_allowed():
    model = conv_then("y = BatchNormalization (c, s, b, m, v)")
    model.graph.input.append(onnx.helper.make_tensor_value_info("v", onnx.TensorProto.FLOAT, [4]))
    kept(model, Reason.OVERRIDABLE_PARAMETER)
    result = fuse(model, allow_overridable=True)
    assert bn_count(result.to_model()) == 0
    check(result.to_model())
    assert "v" not in {i.name for i in result.to_model().graph.input}


@pytest.mark.parametrize("var", [-1.0, np.nan, np.inf])
def test_invalid_statistics(var):
    p = bn_params(4)
    p["v"][1] = var
    kept(conv_then("y = BatchNormalization (c, s, b, m, v)", **p), Reason.INVALID_PARAMETERS)


def test_no_host_graph_input_then_activation():
    model = build(f"""{HEAD}
    g (float[N,4,6,6] x) => (float[N,4,6,6] y) {{
        z = BatchNormalization (x, s, b, m, v)
        y = Relu (z)
    }}""", **bn_params(4))
    rec = kept(model, Reason.NO_HOST)
    assert "input of the main graph" in rec.detail


def test_activation_between_host_and_bn():
    rec = kept(conv_then("r = Relu (c)\n        z = BatchNormalization (r, s, b, m, v)", "y = Relu (z)"),
               Reason.ACTIVATION_BETWEEN)
    assert "Relu" in rec.detail and "Conv" in rec.detail


def test_host_output_feeds_other_nodes():
    kept(conv_then("z = BatchNormalization (c, s, b, m, v)", "y = Add (z, c)"), Reason.HOST_OUTPUT_IN_USE)


def test_host_output_is_graph_output():
    kept(conv_then("y = BatchNormalization (c, s, b, m, v)", outputs="float[N,4,6,6] y, float[N,4,6,6] c"),
         Reason.HOST_OUTPUT_IN_USE)


def test_host_weight_not_constant():
    model = build(f"""{HEAD}
    g (float[N,4,6,6] x, float[4,4,3,3] W) => (float[N,4,6,6] y) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, W)
        y = BatchNormalization (c, s, b, m, v)
    }}""", **bn_params(4))
    kept(model, Reason.HOST_WEIGHT_NOT_CONSTANT)


def test_quantized_weight_is_never_dequantized():
    model = build(f"""{HEAD}
    g (float[N,4,6,6] x) => (float[N,4,6,6] y) {{
        W = DequantizeLinear (Wq, ws, wz)
        c = Conv <pads = [1, 1, 1, 1]> (x, W)
        y = BatchNormalization (c, s, b, m, v)
    }}""", Wq=np.ones((4, 4, 3, 3), np.int8), ws=np.array(0.1, np.float32), wz=np.array(0, np.int8),
                  **bn_params(4))
    kept(model, Reason.QUANTIZED_WEIGHT)


def test_matmul_3d_output_straight_into_bn():
    """BN normalises axis 1 (tokens), the MatMul's features are on axis 2: never fold."""
    model = build(f"""{HEAD}
    g (float[2,6,5] x) => (float[2,6,6] y) {{
        c = MatMul (x, W)
        y = BatchNormalization (c, s, b, m, v)
    }}""", W=rand(5, 6), **bn_params(6))
    kept(model, Reason.CHANNEL_AXIS_MISMATCH)


def test_transpose_between_matmul_and_bn():
    """A Transpose that leaves the features on the last axis (the twin of test_fold_layout's
    bn(x.transpose(1, 2)), which folds)."""
    model = build(f"""{HEAD}
    g (float[6,6,5] x) => (float[6,6,6] y) {{
        c = MatMul (x, W)
        t = Transpose <perm = [1, 0, 2]> (c)
        y = BatchNormalization (t, s, b, m, v)
    }}""", W=rand(5, 6), **bn_params(6))
    kept(model, Reason.CHANNEL_AXIS_MISMATCH)


@pytest.mark.parametrize("target,tokens", [([-1, 12], 6), ([6, -1], 6), ([-1, 0], 4)])
def test_reshape_that_moves_features(target, tokens):
    # [-1, 0] copies the token axis; with 6 tokens it would be [12, 6], features last (exact)
    model = build(f"""{HEAD}
    g (float[2,{tokens},5] x) => (float[?,?] y) {{
        c = MatMul (x, W)
        r = Reshape (c, shape)
        y = BatchNormalization (r, s, b, m, v)
    }}""", W=rand(5, 6), shape=np.array(target, np.int64), **bn_params(12 if 12 in target else 6))
    kept(model, Reason.CHANNEL_AXIS_MISMATCH, valid=False)


def test_flatten_that_merges_features():
    model = build(f"""{HEAD}
    g (float[2,3,5] x) => (float[2,18] y) {{
        c = MatMul (x, W)
        r = Flatten <axis = 1> (c)
        y = BatchNormalization (r, s, b, m, v)
    }}""", W=rand(5, 6), **bn_params(18))
    kept(model, Reason.CHANNEL_AXIS_MISMATCH)


def test_following_conv_pads():
    model = build(f"""{HEAD}
    g (float[N,4,6,6] x) => (float[N,4,6,6] y) {{
        z = BatchNormalization (x, s, b, m, v)
        y = Conv <pads = [1, 1, 1, 1]> (z, W)
    }}""", W=rand(4, 4, 3, 3), **bn_params(4))
    kept(model, Reason.FOLLOWING_CONV_PADDED)


def test_float16_overflow_is_refused_not_inf():
    p = bn_params(4)
    p["v"][:] = 1e-6
    p["s"][:] = 50.0
    model = build(f"""{HEAD}
    g (float16[N,4,6,6] x) => (float16[N,4,6,6] y) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, W)
        y = BatchNormalization <epsilon = 1e-6> (c, s, b, m, v)
    }}""", W=np.full((4, 4, 3, 3), 3.0, np.float16), **p)
    rec = kept(model, Reason.OVERFLOW)
    assert "float16" in rec.detail


def test_unsupported_parameter_dtype_does_not_crash():
    p = {k: v.astype(np.int64) for k, v in bn_params(4).items()}
    kept(conv_then("y = BatchNormalization (c, s, b, m, v)", **p), Reason.UNSUPPORTED_DTYPE, valid=False)


def test_channel_count_mismatch_does_not_crash():
    kept(conv_then("y = BatchNormalization (c, s, b, m, v)", **bn_params(5)), Reason.CHANNEL_COUNT_MISMATCH,
         valid=False)


@pytest.mark.parametrize("line", [
    "y = BatchNormalization (c, s, b, m)",
    "y = BatchNormalization (c, s, b, m, v) ",
])
def test_malformed_bn_never_crashes(line):
    model = conv_then(line, v=np.ones((2, 2), np.float32))
    result = fuse(model)
    assert len(result.kept) == 1 and result.kept[0].reason == Reason.INVALID_PARAMETERS


def test_every_reason_code_is_documented_in_readme():
    from conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    for reason in Reason:
        assert f"`{reason.value}`" in readme, reason


def test_conv_attributes_from_calling_function_are_not_guessed():
    from onnx import helper

    p = bn_params(4)
    body = [helper.make_node("Constant", [], [k], value=numpy_helper.from_array(v, k)) for k, v in p.items()]
    body.append(helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(rand(4, 2, 1, 1), "W")))
    conv = helper.make_node("Conv", ["x", "W"], ["c"])
    conv.attribute.append(helper.make_attribute_ref("group", onnx.AttributeProto.INT))
    body += [conv, helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"])]
    fn = helper.make_function("local", "ConvBn", ["x"], ["y"], body, [helper.make_opsetid("", 15)], ["group"])
    call = helper.make_node("ConvBn", ["x"], ["y"], domain="local", group=2)
    graph = helper.make_graph([call], "g", [helper.make_tensor_value_info("x", 1, ["N", 4, 3, 3])],
                              [helper.make_tensor_value_info("y", 1, ["N", 4, 3, 3])])
    model = helper.make_model(graph, functions=[fn], opset_imports=[helper.make_opsetid("", 15),
                                                                   helper.make_opsetid("local", 1)])
    model.ir_version = 8
    rec = kept(model, Reason.UNSUPPORTED_HOST)
    assert "calling function" in rec.detail


def test_group_that_does_not_divide_the_weight_does_not_crash():
    model = conv_then("y = BatchNormalization (c, s, b, m, v)", W=rand(4, 4, 3, 3))
    model.graph.node[0].op_type = "ConvTranspose"
    model.graph.node[0].attribute.append(onnx.helper.make_attribute("group", 3))
    kept(model, Reason.UNSUPPORTED_HOST, valid=False)


def test_old_opset_gemm_gets_broadcast_for_its_new_bias():
    model = build("""<ir_version: 3, opset_import: ["" : 6]>
    g (float[3,5] a, float[5,6] W, float[3,6] C, float[6] s, float[6] b, float[6] m, float[6] v)
      => (float[3,6] y) {
        c = Gemm (a, W, C)
        y = BatchNormalization <is_test = 1> (c, s, b, m, v)
    }""", W=rand(5, 6), C=rand(3, 6), **bn_params(6))
    result = fuse(model)
    check(result.to_model())
    gemm = result.to_model().graph.node[0]
    assert bn_count(result.to_model()) == 0
    assert {a.name: onnx.helper.get_attribute_value(a) for a in gemm.attribute}["broadcast"] == 1


@pytest.mark.parametrize("other,reason", [
    ("r = Relu (x)", Reason.NO_HOST),                          # DenseNet: the block input joins the concat
    ("r = Conv (x, W2)\n        z = Relu (r)", Reason.HOST_OUTPUT_IN_USE),  # a conv output also used elsewhere
])
def test_concat_with_a_non_foldable_input_is_kept(other, reason):
    outputs = "float[N,8,6,6] y" + (", float[N,4,6,6] z" if "z =" in other else "")
    model = build(f"""{HEAD}
    g (float[N,4,6,6] x) => ({outputs}) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, W)
        {other}
        cat = Concat <axis = 1> (c, r)
        y = BatchNormalization (cat, s, b, m, v)
    }}""", W=rand(4, 4, 3, 3), W2=rand(4, 4, 1, 1), **bn_params(8))
    rec = kept(model, reason)
    assert "input 1 of Concat" in rec.detail


def test_concat_on_a_spatial_axis_is_kept():
    model = build(f"""{HEAD}
    g (float[N,4,6,6] x) => (float[N,4,12,6] y) {{
        a = Conv <pads = [1, 1, 1, 1]> (x, W)
        c = Conv <pads = [1, 1, 1, 1]> (x, W2)
        cat = Concat <axis = 2> (a, c)
        y = BatchNormalization (cat, s, b, m, v)
    }}""", W=rand(4, 4, 3, 3), W2=rand(4, 4, 3, 3, seed=3), **bn_params(4))
    kept(model, Reason.CHANNEL_AXIS_MISMATCH)
