"""BNs already decomposed into a per-channel Mul (+ Add) of constants after a host fold like BNs,
reported apart from the BatchNormalization records."""
from __future__ import annotations

import numpy as np
import pytest

from bnfold import Reason, fuse
from conftest import assert_equivalent, build, check, rand

HEAD = '<ir_version: 8, opset_import: ["" : 15]>'


def ops(model):
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("shape", [(4, 1, 1), (1, 4, 1, 1)])
def test_conv_then_per_channel_mul_and_add(shape):
    model = build(f"""{HEAD}
    g (float[N,4,6,6] x) => (float[N,4,6,6] y) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, W, B)
        m = Mul (c, k)
        y = Add (m, a)
    }}""", W=rand(4, 4, 3, 3), B=rand(4, seed=2), k=rand(*shape, seed=3), a=rand(*shape, seed=4))
    check(model)
    result = fuse(model)
    check(result.to_model())
    assert ops(result.to_model()) == ["Conv"]
    assert not result.records and [r.folded for r in result.decomposed] == [True]
    assert result.decomposed[0].host_op == "Conv" and "Mul 'Mul#1' and Add 'Add#2'" in result.decomposed[0].detail
    assert result.to_dict()["decomposed_bn"][0]["direction"] == "into_preceding"
    assert_equivalent(model, result.to_model())


def test_matmul_then_per_feature_mul_and_add_makes_the_bias_add():
    model = build(f"""{HEAD}
    g (float[N,7,5] x) => (float[N,7,6] y) {{
        c = MatMul (x, W)
        m = Mul (k, c)
        y = Add (m, a)
    }}""", W=rand(5, 6), k=rand(6, seed=3), a=rand(6, seed=4))
    result = fuse(model)
    check(result.to_model())
    assert ops(result.to_model()) == ["MatMul", "Add"]
    assert_equivalent(model, result.to_model())


def test_matmul_then_mul_only_needs_no_bias_node():
    model = build(f"""{HEAD}
    g (float[N,5] x) => (float[N,6] y) {{
        c = MatMul (x, W)
        y = Mul (c, k)
    }}""", W=rand(5, 6), k=rand(6, seed=3))
    result = fuse(model)
    check(result.to_model())
    assert ops(result.to_model()) == ["MatMul"]
    assert_equivalent(model, result.to_model())


def test_gemm_then_mul_only():
    model = build(f"""{HEAD}
    g (float[N,5] x) => (float[N,6] y) {{
        c = Gemm <transB = 1> (x, W, C)
        y = Mul (c, k)
    }}""", W=rand(6, 5), C=rand(6, seed=2), k=rand(1, 6, seed=3))
    result = fuse(model)
    check(result.to_model())
    assert ops(result.to_model()) == ["Gemm"]
    assert_equivalent(model, result.to_model())


# -- near misses --------------------------------------------------------------------------

def test_host_output_read_elsewhere_is_kept_with_its_reason():
    model = build(f"""{HEAD}
    g (float[N,4,6,6] x) => (float[N,4,6,6] y, float[N,4,6,6] c) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, W)
        m = Mul (c, k)
        y = Add (m, a)
    }}""", W=rand(4, 4, 3, 3), k=rand(4, 1, 1, seed=3), a=rand(4, 1, 1, seed=4))
    result = fuse(model)
    assert [r.reason for r in result.decomposed] == [Reason.HOST_OUTPUT_IN_USE]
    assert result.to_model().graph.node[1].op_type == "Mul"


def test_constant_along_a_spatial_axis_is_not_a_channel_scale():
    model = build(f"""{HEAD}
    g (float[N,4,6,6] x) => (float[N,4,6,6] y) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, W)
        y = Mul (c, k)
    }}""", W=rand(4, 4, 3, 3), k=rand(6, seed=3))
    result = fuse(model)
    assert [r.reason for r in result.decomposed] == [Reason.CHANNEL_AXIS_MISMATCH]
    assert_equivalent(model, result.to_model())


@pytest.mark.parametrize("line", ["y = Mul (c, half)", "r = Relu (c)\n        y = Mul (r, k)"])
def test_scalar_mul_or_no_host_is_not_reported(line):
    model = build(f"""{HEAD}
    g (float[N,4,6,6] x) => (float[N,4,6,6] y) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, W)
        {line}
    }}""", W=rand(4, 4, 3, 3), half=np.array(0.5, np.float32), k=rand(4, 1, 1, seed=3))
    result = fuse(model)
    assert not result.decomposed and "decomposed_bn" not in result.to_dict()
    assert "Mul" in ops(result.to_model())


def test_the_table_lists_decomposed_bns_apart(tmp_path):
    """`inspect` says how many decomposed BNs folded, apart from the BatchNormalization table."""
    from click.testing import CliRunner

    import onnx

    from bnfold.cli import main

    model = build(f"""{HEAD}
    g (float[N,4,6,6] x) => (float[N,4,6,6] y) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, W, B)
        m = Mul (c, k)
        y = Add (m, a)
    }}""", W=rand(4, 4, 3, 3), B=rand(4, seed=2), k=rand(4, 1, 1, seed=3), a=rand(4, 1, 1, seed=4))
    path = tmp_path / "decomposed.onnx"
    onnx.save(model, path)
    res = CliRunner().invoke(main, ["inspect", str(path), "-v"])
    assert res.exit_code == 0, res.output
    assert "decomposed BN (per-channel Mul/Add after a linear op): 1 of 1 folded" in res.output
    assert "Mul#1" in res.output and "into Conv" in res.output
