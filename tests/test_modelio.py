"""Reading and writing models: streamed serialization round-trips, writes are atomic."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold import BnfoldError, fuse, modelio
from bnfold.modelio import stream
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
    assert saved == result.to_model()  # to_model() writes the replacements into the model


def test_failed_write_keeps_old_output_and_leaves_no_temporary(tmp_path, monkeypatch):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old output")
    model = onnx.load(str(MODELS / "mlp_bn1d.onnx"))

    def disk_full(model, f, replacements=None):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(stream, "write_model", disk_full)
    with pytest.raises(BnfoldError, match="No space left on device"):
        modelio.save_model(model, out)
    assert out.read_bytes() == b"old output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_interrupted_write_leaves_no_temporary(tmp_path, monkeypatch):
    out = tmp_path / "out.onnx"
    model = onnx.load(str(MODELS / "mlp_bn1d.onnx"))

    def interrupted(model, f, replacements=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(stream, "write_model", interrupted)
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
    assert back == fuse(onnx.load(str(MODELS / "resnet_mini.onnx"))).to_model()


# -- file modes: an output follows what the user already has ------------------------------------

def mode(path) -> int:
    import os
    import stat

    return stat.S_IMODE(os.stat(path).st_mode)


def external_copy(folder, name: str = "m.onnx", data: str = "m.onnx.data"):
    """resnet_mini with every weight in the external data file ``data``."""
    model = onnx.load(str(MODELS / "resnet_mini.onnx"))
    onnx.save_model(model, str(folder / name), save_as_external_data=True, location=data, size_threshold=0)
    return folder / name, folder / data


@pytest.mark.parametrize("input_mode", [0o600, 0o640, 0o604])
def test_new_output_takes_the_input_models_mode(tmp_path, input_mode):
    import shutil

    from bnfold import fuse_file

    src = tmp_path / "m.onnx"
    shutil.copy(MODELS / "resnet_mini.onnx", src)
    src.chmod(input_mode)
    outcome = fuse_file(src, tmp_path / "out.onnx", verify=False)
    assert outcome.exit_code == 0, outcome.error
    assert mode(tmp_path / "out.onnx") == input_mode


def test_in_place_keeps_the_models_mode(tmp_path):
    import shutil

    from bnfold import fuse_file

    src = tmp_path / "m.onnx"
    shutil.copy(MODELS / "resnet_mini.onnx", src)
    src.chmod(0o600)
    before = src.read_bytes()
    outcome = fuse_file(src, in_place=True, verify=False)
    assert outcome.exit_code == 0, outcome.error
    assert src.read_bytes() != before and mode(src) == 0o600


def test_replaced_output_keeps_its_own_mode(tmp_path):
    import shutil

    from bnfold import fuse_file

    src = tmp_path / "m.onnx"
    shutil.copy(MODELS / "resnet_mini.onnx", src)
    src.chmod(0o644)
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old output")
    out.chmod(0o600)
    assert fuse_file(src, out, verify=False).exit_code == 0
    assert out.read_bytes() != b"old output" and mode(out) == 0o600


def test_external_data_output_takes_the_input_data_files_mode(tmp_path):
    from bnfold import fuse_file

    model, data = external_copy(tmp_path)
    model.chmod(0o644)
    data.chmod(0o600)
    assert fuse_file(model, tmp_path / "out.onnx", verify=False).exit_code == 0
    assert mode(tmp_path / "out.onnx") == 0o644
    assert mode(tmp_path / "out.onnx.data") == 0o600


def test_in_place_with_external_data_keeps_both_modes(tmp_path):
    from bnfold import fuse_file

    model, data = external_copy(tmp_path)
    model.chmod(0o640)
    data.chmod(0o600)
    before = data.read_bytes()
    assert fuse_file(model, in_place=True, verify=False).exit_code == 0
    assert data.read_bytes() != before  # the folded weights were written over the old data file
    assert (mode(model), mode(data)) == (0o640, 0o600)


def test_a_model_without_a_source_file_gets_the_default_mode(tmp_path):
    import os

    mask = os.umask(0o027)
    try:
        modelio.save_model(onnx.load(str(MODELS / "mlp_bn1d.onnx")), tmp_path / "new.onnx")
    finally:
        os.umask(mask)
    assert mode(tmp_path / "new.onnx") == 0o640


def test_replaced_report_keeps_its_mode(tmp_path):
    report = tmp_path / "r.json"
    report.write_text("{}")
    report.chmod(0o600)
    modelio.write_bytes_atomic(report, b'{"new": 1}\n')
    assert report.read_bytes() == b'{"new": 1}\n' and mode(report) == 0o600
