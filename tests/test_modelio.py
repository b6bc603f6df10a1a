"""Reading and writing models: streamed serialization round-trips, writes are atomic."""
from __future__ import annotations

import os

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

    def disk_full(model, f, replacements=None, base_dir=None):
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

    def interrupted(model, f, replacements=None, base_dir=None):
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


def big_weights_model() -> onnx.ModelProto:
    """``odd_model`` plus weights large enough to be left in the file at load (float32,
    float16), and one as large in a typed field (parsed as usual)."""
    m = odd_model()
    rng = np.random.default_rng(0)
    m.graph.initializer.extend([
        numpy_helper.from_array(rng.standard_normal((64, 80)).astype(np.float32), "big"),
        numpy_helper.from_array(rng.standard_normal((100, 90)).astype(np.float16), "big_half"),
        helper.make_tensor("big_typed", TensorProto.FLOAT, [5000], np.arange(5000, dtype=np.float32)),
    ])
    return m


def test_weights_left_in_the_model_file_read_and_write_back_as_onnx_reads_them(tmp_path):
    from bnfold.modelio.load import load_source
    from bnfold.modelio.tensors import in_model_file

    path = tmp_path / "m.onnx"
    onnx.save(big_weights_model(), str(path))
    reference = onnx.load(str(path))
    loaded, external, _ = load_source(path, load_external=False, leave_weights=True)
    assert not external
    assert sorted(t.name for t in loaded.graph.initializer if in_model_file(t)) == ["big", "big_half"]
    values = {t.name: modelio.read_tensor(t, tmp_path) for t in loaded.graph.initializer}
    for t in reference.graph.initializer:
        np.testing.assert_array_equal(values[t.name], numpy_helper.to_array(t))
        assert values[t.name].dtype == numpy_helper.to_array(t).dtype
    modelio.stage_model(loaded, tmp_path / "inline.onnx", base_dir=tmp_path).commit()
    assert onnx.load(str(tmp_path / "inline.onnx")) == reference  # back inline, field for field
    loaded, _, _ = load_source(path, load_external=False, leave_weights=True)
    modelio.stage_model(loaded, tmp_path / "ext.onnx", external_data=True, base_dir=tmp_path).commit()
    split = onnx.load(str(tmp_path / "ext.onnx"))  # onnx reads the new .data file
    for a, b in zip(split.graph.initializer, reference.graph.initializer):
        assert a.name == b.name
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))


def test_fold_of_a_file_equals_fold_of_the_same_model_in_memory(tmp_path):
    path = MODELS / "resnet_mini.onnx"
    from_file, in_memory = fuse(path), fuse(onnx.load(str(path)))
    from_file.save(tmp_path / "a.onnx")
    in_memory.save(tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    model = fuse(path).to_model()  # self-contained: every weight back inline
    assert not any(t.external_data or t.data_location for t in model.graph.initializer)
    assert model == onnx.load(str(tmp_path / "b.onnx"))


@pytest.mark.parametrize("change", ["rewritten", "replaced", "truncated", "removed"])
def test_a_model_file_changed_before_its_weights_are_copied_is_an_error_not_a_mix(tmp_path, change):
    import os

    path = tmp_path / "m.onnx"
    onnx.save(big_weights_model(), str(path))
    result = fuse(path)  # no BN: every large weight is copied from the file when saved
    other = big_weights_model()
    other.graph.initializer[-3].raw_data = np.zeros((64, 80), np.float32).tobytes()  # same size, new values
    if change == "rewritten":
        with open(path, "r+b") as f:
            f.write(other.SerializeToString())
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a coarse clock would not show it
    elif change == "replaced":
        (tmp_path / "new").write_bytes(other.SerializeToString())
        os.replace(tmp_path / "new", path)
    elif change == "truncated":
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
    else:
        path.unlink()
    with pytest.raises(BnfoldError, match="changed while bnfold read it") as e:
        result.save(tmp_path / "out.onnx")
    assert e.value.path == str(path)  # the input that changed, not the output
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if change == "removed" else ["m.onnx"])


def test_splitting_falls_back_to_a_whole_parse_for_unusual_layouts():
    from bnfold.modelio.stream import split_weights

    data = big_weights_model().SerializeToString()
    skeleton, left_out = split_weights(memoryview(data), 1 << 14)
    assert [k for k, _, _ in left_out] == [6, 7]  # "big", "big_half": the initializers' positions
    parsed = onnx.ModelProto.FromString(skeleton)
    for k, offset, length in left_out:
        parsed.graph.initializer[k].raw_data = data[offset:offset + length]
    assert parsed == big_weights_model()
    twice = data + onnx.ModelProto(graph=onnx.GraphProto(name="x")).SerializeToString()  # the graph field again
    assert split_weights(memoryview(twice), 1 << 14) is None
    assert split_weights(memoryview(data), 1 << 30) is None  # nothing that large
    with pytest.raises((ValueError, IndexError)):
        split_weights(memoryview(b"\xff\xff\xff"), 1)


def test_a_second_ctrl_c_during_clean_up_leaves_no_staging_folder(tmp_path, monkeypatch):
    """The first Ctrl-C stops the write; a second one while the staging folder is removed must not
    leave it behind (a trial found empty hidden folders after double Ctrl-C)."""
    import signal

    from bnfold.modelio import stream, write

    real_rmtree = write.shutil.rmtree

    def interrupted_write(*args, **kwargs):
        raise KeyboardInterrupt

    def second_ctrl_c_then_remove(path, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real_rmtree(path, **kwargs)

    monkeypatch.setattr(stream, "write_model", interrupted_write)
    monkeypatch.setattr(write.shutil, "rmtree", second_ctrl_c_then_remove)
    model = onnx.load(str(MODELS / "resnet_mini.onnx"))
    with pytest.raises(KeyboardInterrupt):
        write.stage_model(model, tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []
