"""Properties of the written model: interface kept, deterministic, idempotent, tidy."""
from __future__ import annotations

import onnx
from onnx import helper

from bnfold import fuse
from conftest import MODELS, assert_equivalent, bn_params, build, check, rand

HEAD = '<ir_version: 8, opset_import: ["" : 15]>'


def sample():
    return onnx.load(str(MODELS / "resnet_mini.onnx"))


def test_interface_metadata_and_provenance_are_kept():
    model = sample()
    model.doc_string = "trained on things"
    model.metadata_props.add(key="author", value="someone")
    model.graph.doc_string = "graph doc"
    result = fuse(model)
    out = result.to_model()
    for field in ("input", "output"):
        assert [v.SerializeToString() for v in getattr(out.graph, field)] == \
               [v.SerializeToString() for v in getattr(model.graph, field)]
    assert out.ir_version == model.ir_version and list(out.opset_import) == list(model.opset_import)
    assert out.doc_string == "trained on things" and out.graph.doc_string == "graph doc"
    props = {p.key: p.value for p in out.metadata_props}
    assert props["author"] == "someone" and props["bnfold"].startswith("fuse ")


def test_deterministic_and_idempotent():
    a = fuse(sample()).to_model().SerializeToString()
    b = fuse(sample()).to_model().SerializeToString()
    assert a == b
    again = fuse(onnx.load_from_string(a))
    assert not again.folded and again.to_model().SerializeToString() == a


def test_input_model_object_is_not_modified():
    model = sample()
    before = model.SerializeToString()
    fuse(model)
    assert model.SerializeToString() == before


def test_orphaned_initializers_and_value_info_are_removed():
    model = build(f"""{HEAD}
    g (float[N,4,6,6] x) => (float[N,4,6,6] y) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, W)
        y = BatchNormalization (c, s, b, m, v)
    }}""", W=rand(4, 4, 3, 3), **bn_params(4))
    model.graph.value_info.append(helper.make_tensor_value_info("c", 1, ["N", 4, 6, 6]))
    out = fuse(model).to_model()
    assert {t.name for t in out.graph.initializer} == {"W", "c_bias_bnfold"}
    assert not out.graph.value_info


def test_generated_names_never_collide():
    """The names bnfold would generate already exist: as tensors, initializers of other nodes, node names."""
    model = build(f"""{HEAD}
    g (float[N,4,6,6] x) => (float[N,4,6,6] y, float[N,4,6,6] z, float[N,4,6,6] w2) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, W)
        y = BatchNormalization (c, s, b, m, v)
        c_bias_bnfold = Relu (x)
        z = Add (c_bias_bnfold, c_weight_bnfold)
        w2 = Conv <pads = [1, 1, 1, 1]> (x, W)
    }}""", W=rand(4, 4, 3, 3), **bn_params(4), c_weight_bnfold=rand(4, 1, 1))
    model.graph.node[3].name = "c_bias_bnfold_0"
    result = fuse(model)
    check(result.to_model())
    assert not result.kept
    assert_equivalent(model, result.to_model())


def test_kept_bn_model_is_unchanged_bytes():
    model = build(f"""{HEAD}
    g (float[N,4,6,6] x) => (float[N,4,6,6] y) {{
        z = BatchNormalization (x, s, b, m, v)
        y = Relu (z)
    }}""", **bn_params(4))
    before = model.SerializeToString()
    assert fuse(model).to_model().SerializeToString() == before
