"""Weights and BN parameters computed from constants (exporters' ConstantOfShape, Cast, weight_norm ...)
are evaluated as the runtime would, folded, and leave no dead subgraph behind."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

from bnfold import Reason, fuse
from conftest import assert_equivalent, bn_count, bn_params, build, check, folds_completely, rand

HEAD = '<ir_version: 8, opset_import: ["" : 15]>'


def ops(model):
    return [n.op_type for n in model.graph.node]


def test_float16_weight_behind_cast():
    model = build(f"""{HEAD}
    g (float[N,4,6,6] x) => (float[N,4,6,6] y) {{
        W = Cast <to = 1> (Wh)
        c = Conv <pads = [1, 1, 1, 1]> (x, W)
        y = BatchNormalization (c, s, b, m, v)
    }}""", Wh=rand(4, 4, 3, 3, dtype=np.float16), **bn_params(4))
    result = folds_completely(model)
    assert ops(result.to_model()) == ["Conv"]
    assert "Wh" not in {t.name for t in result.to_model().graph.initializer}  # no dead subgraph left


def test_weight_norm_weight():
    """torch weight_norm: W = g * v / ||v|| over all but the output axis."""
    model = build(f"""{HEAD}
    g (float[N,4,6,6] x) => (float[N,4,6,6] y) {{
        n = ReduceL2 <axes = [1, 2, 3], keepdims = 1> (wv)
        d = Div (wv, n)
        W = Mul (wg, d)
        c = Conv <pads = [1, 1, 1, 1]> (x, W)
        y = BatchNormalization (c, s, b, m, v)
    }}""", wv=rand(4, 4, 3, 3), wg=rand(4, 1, 1, 1, seed=3), **bn_params(4))
    result = folds_completely(model)
    assert ops(result.to_model()) == ["Conv"]


def test_constant_of_shape_and_unsqueezed_parameters():
    """The onnx wheel's light model-zoo graphs build every tensor this way."""
    fill = onnx.helper.make_tensor("f", onnx.TensorProto.FLOAT, [1], [0.25])
    model = build(f"""{HEAD}
    g (float[N,4,6,6] x) => (float[N,4,6,6] y) {{
        W = ConstantOfShape (wshape)
        vr = Unsqueeze (v4, zero)
        vv = Reshape (vr, four)
        sc = Sqrt (s2)
        c = Conv <pads = [1, 1, 1, 1]> (x, W)
        y = BatchNormalization (c, sc, b, m, vv)
    }}""", wshape=np.array([4, 4, 3, 3], np.int64), v4=np.array([0.5, 2.0, 1.0, 3.0], np.float32),
                  zero=np.array([0], np.int64), four=np.array([4], np.int64),
                  s2=np.array([0.25, 4.0, 1.0, 2.0], np.float32), **{k: v for k, v in bn_params(4).items()
                                                                    if k in ("b", "m")})
    for n in model.graph.node:
        if n.op_type == "ConstantOfShape":
            n.attribute.append(onnx.helper.make_attribute("value", fill))
    result = folds_completely(model)
    assert ops(result.to_model()) == ["Conv"]
    assert {t.name for t in result.to_model().graph.initializer} == set(result.to_model().graph.node[0].input[1:])


def test_dynamo_style_zero_bias_cast_like_the_input():
    """torch.onnx dynamo exports (no constant folding) make every Conv bias this way."""
    model = build(f"""{HEAD}
    g (float[N,4,6,6] x) => (float[N,4,6,6] y) {{
        z = Constant <value = double[1] {{0.5}}> ()
        zc = CastLike (z, x)
        sh = Shape <start = 0, end = 1> (W)
        bias = Expand (zc, sh)
        c = Conv <pads = [1, 1, 1, 1]> (x, W, bias)
        y = BatchNormalization (c, s, b, m, v)
    }}""", W=rand(4, 4, 3, 3), **bn_params(4))
    result = folds_completely(model)
    assert ops(result.to_model()) == ["Conv"]


def test_cast_like_of_a_run_time_value_is_not_constant():
    model = build(f"""{HEAD}
    g (float[N,4,6,6] x, double[4] h) => (float[N,4,6,6] y) {{
        bias = CastLike (h, x)
        c = Conv <pads = [1, 1, 1, 1]> (x, W, bias)
        y = BatchNormalization (c, s, b, m, v)
    }}""", W=rand(4, 4, 3, 3), **bn_params(4))
    result = fuse(model)
    assert [r.reason for r in result.kept] == [Reason.HOST_WEIGHT_NOT_CONSTANT]
    assert "CastLike" in result.kept[0].detail


def test_matmul_weight_from_reshaped_concat():
    model = build(f"""{HEAD}
    g (float[N,6] x) => (float[N,4] y) {{
        cat = Concat <axis = 0> (wa, wb)
        W = Reshape (cat, shape)
        c = MatMul (x, W)
        y = BatchNormalization (c, s, b, m, v)
    }}""", wa=rand(12), wb=rand(12, seed=2), shape=np.array([6, 4], np.int64), **bn_params(4))
    folds_completely(model)


def test_shared_computed_weight_is_not_changed_for_its_other_reader():
    model = build(f"""{HEAD}
    g (float[N,4,6,6] x) => (float[N,4,6,6] y, float[N,4,6,6] z) {{
        W = Cast <to = 1> (Wh)
        c = Conv <pads = [1, 1, 1, 1]> (x, W)
        y = BatchNormalization (c, s, b, m, v)
        z = Conv <pads = [1, 1, 1, 1]> (x, W)
    }}""", Wh=rand(4, 4, 3, 3, dtype=np.float16), **bn_params(4))
    result = folds_completely(model)
    assert ops(result.to_model()).count("Cast") == 1  # still computes the second Conv's weight


# -- near misses: same situation, same code ------------------------------------------------

def test_weight_computed_from_a_graph_input_is_not_constant():
    model = build(f"""{HEAD}
    g (float[N,4,6,6] x, float[4,4,3,3] Wx) => (float[N,4,6,6] y) {{
        W = Mul (Wx, two)
        c = Conv <pads = [1, 1, 1, 1]> (x, W)
        y = BatchNormalization (c, s, b, m, v)
    }}""", two=np.array(2.0, np.float32), **bn_params(4))
    result = fuse(model)
    assert [r.reason for r in result.kept] == [Reason.HOST_WEIGHT_NOT_CONSTANT]
    assert "Mul" in result.kept[0].detail


def test_dequantized_weight_behind_cast_stays_quantized():
    model = build(f"""{HEAD}
    g (float[N,4,6,6] x) => (float[N,4,6,6] y) {{
        Wd = DequantizeLinear (Wq, ws, wz)
        W = Cast <to = 1> (Wd)
        c = Conv <pads = [1, 1, 1, 1]> (x, W)
        y = BatchNormalization (c, s, b, m, v)
    }}""", Wq=np.ones((4, 4, 3, 3), np.int8), ws=np.array(0.1, np.float32), wz=np.array(0, np.int8),
                  **bn_params(4))
    result = fuse(model)
    assert [r.reason for r in result.kept] == [Reason.QUANTIZED_WEIGHT]


def test_computed_constant_beyond_the_size_cap(monkeypatch):
    import bnfold.graph

    monkeypatch.setattr(bnfold.graph, "MAX_EVAL_ELEMENTS", 100)
    model = build(f"""{HEAD}
    g (float[N,4,6,6] x) => (float[N,4,6,6] y) {{
        W = ConstantOfShape (wshape)
        c = Conv <pads = [1, 1, 1, 1]> (x, W)
        y = BatchNormalization (c, s, b, m, v)
    }}""", wshape=np.array([4, 4, 3, 3], np.int64), **bn_params(4))
    result = fuse(model)
    assert [r.reason for r in result.kept] == [Reason.CONSTANT_TOO_LARGE]
    assert "144" in result.kept[0].detail


# -- the model-zoo graphs shipped in the onnx wheel -----------------------------------------

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
# BNs onnxsim leaves in each (measured): bnfold must not leave more
ONNXSIM_LEAVES = {"light_resnet50": 0, "light_shufflenet": 0, "light_inception_v2": 6, "light_densenet121": 62}


@pytest.mark.parametrize("name", sorted(ONNXSIM_LEAVES))
def test_light_model_zoo_graphs(name):
    path = os.path.join(LIGHT, name + ".onnx")
    if not os.path.exists(path):
        pytest.skip("this onnx wheel ships no light models")
    result = fuse(path)
    check(result.to_model())
    assert bn_count(result.to_model()) <= ONNXSIM_LEAVES[name]
    # each folded BN took its 4 computed parameters with it, and its host's computed weight
    assert result.after.node_count <= result.before.node_count - 5 * len(result.folded)
    if name in ("light_shufflenet", "light_inception_v2"):  # the smaller two: ORT on 224x224 costs seconds
        assert_equivalent(onnx.load(path), result.to_model())
