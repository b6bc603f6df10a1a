"""The verifier knows no host op by name: its float64 cost estimate and its CUDA placement
check work from what a node reads (weight initializers) and its shapes.

References are closed-form multiply-add counts, written out per op here.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold import exact, verification


def one_node(op: str, x, w, attrs=None, y=None) -> onnx.ModelProto:
    W = numpy_helper.from_array(np.zeros(w, np.float32), "W")
    node = helper.make_node(op, ["X", "W"], ["Y"], name="n", **(attrs or {}))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, x)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, y)], [W])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# (op, input shape, weight shape, attributes, multiply-adds: every output (or input, for ConvTranspose)
# position times the weight elements that meet it)
CASES = [
    ("Conv", (2, 8, 16, 16), (16, 8, 3, 3), {"pads": [1] * 4}, 2 * 16 * 16 * 16 * 8 * 9),
    ("Conv", (2, 8, 16, 16), (16, 8, 3, 3), {"pads": [1] * 4, "strides": [2, 2]}, 2 * 8 * 8 * 16 * 8 * 9),
    ("Conv", (2, 8, 16, 16), (8, 1, 3, 3), {"pads": [1] * 4, "group": 8}, 2 * 16 * 16 * 8 * 9),
    ("ConvTranspose", (2, 8, 16, 16), (8, 4, 3, 3), {"strides": [2, 2]}, 2 * 16 * 16 * 8 * 4 * 9),
    ("Gemm", (5, 7), (7, 3), {}, 5 * 7 * 3),
    ("Gemm", (5, 7), (3, 7), {"transB": 1}, 5 * 7 * 3),
    ("MatMul", (2, 5, 7), (7, 3), {}, 2 * 5 * 7 * 3),
]


@pytest.mark.parametrize("op, x, w, attrs, macs", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_cost_estimate_counts_multiply_adds_of_any_weighted_node(op, x, w, attrs, macs):
    assert exact.estimate_seconds(one_node(op, list(x), list(w), attrs), {"X": x}).macs == macs


def test_cost_estimate_ignores_nodes_without_weights():
    graph = helper.make_graph([helper.make_node("Relu", ["X"], ["Y"])], "g",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [4, 8])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert exact.estimate_seconds(model, {"X": (4, 8)}).macs == 0


def test_compute_nodes_are_those_reading_float_weights(tmp_path):
    """Named nodes by name, unnamed ones by op type; int64 shapes and scalars are no weights."""
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,4,4] x) => (float[1,12] y) {
        c = Conv (x, W)
        b = BatchNormalization (c, s, bb, m, v)
        r = Reshape (b, shape)
        h = Mul (r, k)
        y = Gemm <transB = 1> (h, G)
    }""")
    arrays = {"W": np.ones((3, 3, 1, 1), np.float32), "s": np.ones(3, np.float32), "bb": np.zeros(3, np.float32),
              "m": np.zeros(3, np.float32), "v": np.ones(3, np.float32), "shape": np.array([1, 48], np.int64),
              "k": np.array(2.0, np.float32), "G": np.ones((12, 48), np.float32)}
    model.graph.initializer.extend(numpy_helper.from_array(a, n) for n, a in arrays.items())
    names = ["conv", "bn", "reshape", "mul", ""]
    for node, name in zip(model.graph.node, names):
        node.name = name
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    assert verification._weight_readers(str(path)) == ({"conv", "bn"}, {"Gemm"})
