"""Hostile and broken input: exit 2, one line naming the file and the problem, no traceback,
every input byte untouched."""
from __future__ import annotations

import os
import random
import shutil

import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto

from bnfold.modelio import load, write
from bnfold.cli import main
from conftest import MODELS


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_refused(res, path, *needles):
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0], res.output
    for n in needles:
        assert n in lines[0], lines[0]


def with_external(tmp_path, location, data=None):
    model = onnx.load(str(MODELS / "mlp_bn1d.onnx"))
    t = model.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=location)
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    if data is not None:
        (tmp_path / location).write_bytes(data)
    return path


@pytest.mark.parametrize("location,data,needle", [
    ("w.bin", None, "missing"),
    ("w.bin", b"\0" * 16, "shorter"),
    ("/etc/hostname", None, "absolute"),
    ("../w.bin", None, "'..'"),
])
@pytest.mark.parametrize("command", ["fuse", "inspect", "verify"])
def test_bad_external_data(tmp_path, location, data, needle, command):
    path = with_external(tmp_path, location, data)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    args = (command, path, path) if command == "verify" else (command, path)
    assert_refused(run(*args), path, needle)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_symlinked_external_data_outside_the_folder(tmp_path):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 10**6)
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "w.bin").symlink_to(tmp_path / "secret.bin")
    path = with_external(folder, "w.bin")
    assert_refused(run("fuse", path), path, "outside the model's folder")


def test_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    shutil.copy(MODELS / "mlp_bn1d.onnx", path)

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(load, "open", denied, raising=False)  # root reads anything: simulate it
    assert_refused(run("fuse", path), path, "Permission denied")


def test_checker_rejection_names_the_check(tmp_path):
    model = onnx.load(str(MODELS / "mlp_bn1d.onnx"))
    model.graph.node[0].input[0] = "no_such_tensor"
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    assert_refused(run("fuse", path), path, "ONNX checker rejects it", "no_such_tensor")


def test_newer_opset(tmp_path):
    model = onnx.load(str(MODELS / "mlp_bn1d.onnx"))
    model.opset_import[0].version = onnx.defs.onnx_opset_version() + 1
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    assert_refused(run("fuse", path), path, "opset", "newer")


def test_tensor_data_shorter_than_its_dims(tmp_path):
    model = onnx.load(str(MODELS / "mlp_bn1d.onnx"))
    t = next(t for t in model.graph.initializer if t.name == "fc1.bias")
    t.raw_data = t.raw_data[:10]
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    res = run("fuse", path, "--no-verify")
    assert_refused(res, tmp_path / "m.fused.onnx", "fc1.bias", "dims call for")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_output_folder_not_writable(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    shutil.copy(MODELS / "mlp_bn1d.onnx", path)
    real = os.access
    monkeypatch.setattr(write.os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real(p, mode))
    assert_refused(run("fuse", path), tmp_path / "m.fused.onnx", "not writable")


@pytest.mark.parametrize("name", ["mlp_bn1d.onnx", "resnet_mini.onnx"])
def test_mutated_bytes_never_crash(tmp_path, name):
    """Fuzz: flip, drop and insert bytes of valid models; bnfold answers 0 or 2, never a traceback."""
    rng = random.Random(1234)
    good = (MODELS / name).read_bytes()
    path = tmp_path / "m.onnx"
    codes = set()
    for _ in range(60):
        data = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data))
            op = rng.random()
            if op < 0.6:
                data[i] = rng.randrange(256)
            elif op < 0.8:
                del data[i:i + rng.randint(1, 64)]
            else:
                data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        path.write_bytes(bytes(data))
        res = run("fuse", path, "-o", tmp_path / "out.onnx", "--no-verify", "-q")
        assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
        assert res.exit_code in (0, 2), res.output
        assert "Traceback" not in res.output
        codes.add(res.exit_code)
        assert path.read_bytes() == bytes(data)
    assert 2 in codes  # the battery does exercise refusals
