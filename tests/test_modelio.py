"""Reading and writing models: streamed serialization round-trips, writes are atomic."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold import BnfoldError, fuse, modelio
from conftest import MODELS, build


def odd_model() -> onnx.ModelProto:
    """Initializers in every storage form: raw_data, typed fields, strings, float16, empty."""
    m = build("""<ir_version: 8, opset_import: ["" : 15]>
    g (float[N,4] x) => (float[N,4] y) { y = Add (x, a) }""", a=np.arange(4, dtype=np.float32))
    m.graph.initializer.extend([
        helper.make_tensor("typed", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0]),
        helper.make_tensor("ints", TensorProto.INT64, [2], [7, -9]),
        helper.make_tensor("strs", TensorProto.STRING, [2], [b"a", b"bc"]),
        numpy_helper.from_array(np.ones((2, 3), np.float16), "half"),
        numpy_helper.from_array(np.zeros((0, 5), np.float32), "empty"),
    ])
    m.metadata_props.add(key="k", value="v")
    return m


@pytest.mark.parametrize("make", [odd_model] + [
    (lambda p=p: onnx.load(str(p))) for p in sorted(MODELS.glob("*.onnx"))])
def test_streamed_serialization_parses_to_the_same_model(make):
    model = make()
    assert onnx.ModelProto.FromString(modelio.serialize(model)) == model


def test_saved_fold_equals_materialized_model(tmp_path):
    result = fuse(MODELS / "resnet_mini.onnx")
    result.save(tmp_path / "a.onnx")  # streams replacements, model untouched
    saved = onnx.load(str(tmp_path / "a.onnx"))
    assert saved == result.model  # first access writes the replacements into the model


def test_failed_write_keeps_old_output_and_leaves_no_temporary(tmp_path, monkeypatch):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old output")
    model = onnx.load(str(MODELS / "mlp_bn1d.onnx"))

    def disk_full(model, f, replacements=None):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(modelio, "write_model", disk_full)
    with pytest.raises(BnfoldError, match="No space left on device"):
        modelio.save_model(model, out)
    assert out.read_bytes() == b"old output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_interrupted_write_leaves_no_temporary(tmp_path, monkeypatch):
    out = tmp_path / "out.onnx"
    model = onnx.load(str(MODELS / "mlp_bn1d.onnx"))

    def interrupted(model, f, replacements=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(modelio, "write_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        modelio.save_model(model, out)
    assert list(tmp_path.iterdir()) == []


def test_external_data_round_trip_and_names(tmp_path):
    model = onnx.load(str(MODELS / "resnet_mini.onnx"))
    src = tmp_path / "src.onnx"
    onnx.save_model(model, str(src), save_as_external_data=True, location="src.weights", size_threshold=0)
    result = fuse(src)
    assert result.source_external_data
    result.save(tmp_path / "out.onnx", external_data=True)
    assert (tmp_path / "out.onnx.data").exists() and (tmp_path / "src.weights").exists()
    back = modelio.load_model(tmp_path / "out.onnx")
    for t in back.graph.initializer:  # loading external data leaves data_location=DEFAULT set explicitly
        t.ClearField("data_location")
    assert back == fuse(onnx.load(str(MODELS / "resnet_mini.onnx"))).model
