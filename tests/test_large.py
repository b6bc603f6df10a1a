"""Models with external data: fold without loading everything, write external data safely."""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from bnfold.cli import main
from conftest import ROOT, assert_equivalent, bn_count, feeds_for


def make(path, layers=3, channels=64):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_large_model.py"), str(path), "--layers",
                    str(layers), "--channels", str(channels)], check=True, capture_output=True)


def save_external(model, path):
    """Save ``model`` to ``path`` with every tensor over 1 KiB in ``m.bin`` beside it."""
    external = onnx.ModelProto()
    external.CopyFrom(model)  # save_model moves the weights out of the proto it is given
    onnx.save_model(external, str(path), save_as_external_data=True, location="m.bin", size_threshold=1024)


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_external_data_model_folds_and_verifies(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    make(src / "big.onnx")
    before = snapshot(src)
    out = tmp_path / "out"
    out.mkdir()
    res = CliRunner().invoke(main, ["fuse", str(src / "big.onnx"), "-o", str(out / "big.onnx")])
    assert res.exit_code == 0, res.output
    assert "EQUIVALENT" in res.output
    assert snapshot(src) == before  # input bytes untouched
    assert sorted(p.name for p in out.iterdir()) == ["big.onnx", "big.onnx.data"]
    folded = onnx.load(str(out / "big.onnx"))
    assert bn_count(folded) == 0
    original = onnx.load(str(src / "big.onnx"))
    assert_equivalent(original, folded, feeds=feeds_for(original))


def test_output_data_file_never_takes_the_inputs_name(tmp_path):
    make(tmp_path / "a.onnx")  # its data: a.onnx.data
    (tmp_path / "a.onnx").rename(tmp_path / "b.onnx")  # b.onnx refers to a.onnx.data
    before = (tmp_path / "a.onnx.data").read_bytes()
    res = CliRunner().invoke(main, ["fuse", str(tmp_path / "b.onnx"), "-o", str(tmp_path / "a.onnx")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "a.onnx.data").read_bytes() == before
    assert (tmp_path / "a.onnx.1.data").exists()
    assert bn_count(onnx.load(str(tmp_path / "a.onnx"))) == 0


def test_in_place_replaces_the_models_own_data(tmp_path):
    make(tmp_path / "m.onnx")
    res = CliRunner().invoke(main, ["fuse", str(tmp_path / "m.onnx"), "--in-place"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert bn_count(onnx.load(str(tmp_path / "m.onnx"))) == 0


def test_in_place_names_the_data_file_it_leaves_unread(tmp_path):
    """An export's data file not named <model>.data (m.bin) cannot be the output's: after --in-place no
    model reads it. It is not deleted (something outside the folder may use it) but named in a warning,
    unless another model beside it still reads it."""
    make(tmp_path / "src.onnx")
    onnx.save_model(onnx.load(str(tmp_path / "src.onnx")), str(tmp_path / "m.onnx"), save_as_external_data=True,
                    location="m.bin", size_threshold=1024)
    shutil.copy(tmp_path / "m.onnx", tmp_path / "n.onnx")  # a second model reading the same m.bin
    for p in (tmp_path / "src.onnx", tmp_path / "src.onnx.data"):
        p.unlink()
    header = (tmp_path / "m.onnx").read_bytes()
    res = CliRunner().invoke(main, ["fuse", str(tmp_path / "m.onnx"), "--in-place", "--no-verify"])
    assert res.exit_code == 0, res.output
    assert "m.bin" not in res.stderr  # n.onnx still reads it
    before = (tmp_path / "m.bin").read_bytes()
    (tmp_path / "n.onnx").unlink()
    (tmp_path / "m.onnx.data").unlink()
    (tmp_path / "m.onnx").write_bytes(header)  # the export again, m.bin read by it alone
    res = CliRunner().invoke(main, ["fuse", str(tmp_path / "m.onnx"), "--in-place", "--no-verify"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.onnx", "m.onnx.data"]
    assert (tmp_path / "m.bin").read_bytes() == before
    lines = [ln for ln in res.stderr.splitlines() if "m.bin" in ln]
    assert len(lines) == 1 and lines[0].startswith("bnfold: warning: ") and "read by no model" in lines[0], res.stderr


def test_a_report_never_takes_the_name_of_the_outputs_external_data(tmp_path):
    """`fuse m.onnx -o o.onnx --report o.onnx.data` exited 0 with o.onnx's weights replaced by the JSON
    report (written after the model): refused before anything is written."""
    make(tmp_path / "m.onnx")
    before = snapshot(tmp_path)
    for flag in ("--report", "--junit"):
        for name in ("o.onnx.data", "o.onnx.1.data"):
            res = CliRunner().invoke(main, ["fuse", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"),
                                            flag, str(tmp_path / name)])
            assert res.exit_code == 2 and "external data of" in res.stderr, res.output
            assert snapshot(tmp_path) == before


def test_chained_folds_on_external_weights(tmp_path):
    """Conv -> BN -> BN and BN -> Conv with weights in external data: the recipes compose."""
    from conftest import bn_params, build, rand

    model = build("""<ir_version: 8, opset_import: ["" : 15]>
    g (float[N,64,6,6] x) => (float[N,64,6,6] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, W)
        d = BatchNormalization (c, as, ab, am, av)
        e = BatchNormalization (d, bs, bb, bm, bv)
        f = BatchNormalization (e, cs, cb, cm, cv)
        y = Conv (f, W2)
    }""", W=rand(64, 64, 3, 3), W2=rand(64, 64, 1, 1, seed=3), **bn_params(64, 1, "a"), **bn_params(64, 2, "b"),
        **bn_params(64, 4, "c"))
    save_external(model, tmp_path / "m.onnx")
    res = CliRunner().invoke(main, ["fuse", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out.onnx")])
    assert res.exit_code == 0, res.output
    folded = onnx.load(str(tmp_path / "out.onnx"))
    assert bn_count(folded) == 0
    assert_equivalent(model, folded)


def _external_model(tmp_path):
    """Conv(W) -> BN, then Conv(U) with no BN after it: W is folded, U is copied untouched;
    both live in external data."""
    from conftest import bn_params, build, rand

    model = build("""<ir_version: 8, opset_import: ["" : 15]>
    g (float[N,64,6,6] x) => (float[N,64,6,6] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, W)
        d = BatchNormalization (c, s, b, m, v)
        y = Conv <pads = [1, 1, 1, 1]> (d, U)
    }""", W=rand(64, 64, 3, 3), U=rand(64, 64, 3, 3, seed=5), **bn_params(64, 1))
    save_external(model, tmp_path / "m.onnx")
    return model


def _weights(path):
    from onnx import numpy_helper

    m = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


@pytest.mark.parametrize("chunk", [None, 1000])
def test_folded_external_weight_streams_through_reused_block_buffers(tmp_path, monkeypatch, chunk):
    """Blocks of a few rows each, computed ahead of the writer into a handful of reused
    buffers and written a piece at a time (the default pieces; pieces of 1000 bytes, which cut
    values in two): every value must still be W x gamma / sqrt(var + eps) in float64, rounded
    once (a buffer reused before its block was written, or a piece lost, would show here)."""
    import bnfold.modelio.external as external
    import bnfold.modelio.pending as pending

    if chunk is not None:
        monkeypatch.setattr(external, "WRITE_CHUNK", chunk)
    monkeypatch.setattr(pending, "BLOCK_BYTES", 3 * 64 * 9 * 4)  # 3 output channels per block: 22 blocks
    model = _external_model(tmp_path)
    res = CliRunner().invoke(main, ["fuse", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out.onnx"), "-q"])
    assert res.exit_code == 0, res.output
    w = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    got = _weights(tmp_path / "out.onnx")
    scale = w["s"].astype(np.float64) / np.sqrt(w["v"].astype(np.float64) + 1e-5)
    expected = (w["W"].astype(np.float64) * scale[:, None, None, None]).astype(np.float32)
    folded = next(v for k, v in got.items() if v.shape == (64, 64, 3, 3) and k != "U")
    np.testing.assert_array_equal(folded, expected)
    np.testing.assert_array_equal(got["U"], w["U"])


@pytest.mark.parametrize("kernel", ["works", "refused", "missing"])
def test_untouched_external_tensor_is_copied_byte_for_byte(tmp_path, monkeypatch, kernel):
    """The kernel's copy (os.copy_file_range) where the system allows it, the ordinary copy
    where it refuses (another file system: EXDEV) or is missing: the same bytes either way."""
    import errno
    import os

    if kernel == "refused":
        def refuse(*args, **kwargs):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    elif kernel == "missing":
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    model = _external_model(tmp_path)
    res = CliRunner().invoke(main, ["fuse", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out.onnx"), "-q"])
    assert res.exit_code == 0, res.output
    original = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert _weights(tmp_path / "out.onnx")["U"].tobytes() == original["U"].tobytes()
    assert_equivalent(model, onnx.load(str(tmp_path / "out.onnx")))


def _overflowing_external_model(tmp_path):
    """float16 weights in external data: Conv(U) -> BN that folds, then Conv(W) -> BN whose
    fold overflows float16 (3 x 5e4) and that has nothing after it to fold into."""
    from conftest import bn_params, build

    p, q = bn_params(64, 1, "a"), bn_params(64, 2, "b")
    p["av"][:] = 1e-6
    p["as"][:] = 50.0
    p["am"][:] = p["ab"][:] = 0.0  # the bias (0) fits: only the weight overflows
    arrays = {k: v.astype(np.float16) for k, v in {**p, **q}.items()}
    rng = np.random.default_rng(4)
    model = build("""<ir_version: 8, opset_import: ["" : 15]>
    g (float16[N,64,6,6] x) => (float16[N,64,6,6] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, U)
        d = BatchNormalization (c, bs, bb, bm, bv)
        e = Conv <pads = [1, 1, 1, 1]> (d, W)
        y = BatchNormalization <epsilon = 1e-6> (e, as, ab, am, av)
    }""", W=np.full((64, 64, 3, 3), 3.0, np.float16), U=rng.normal(size=(64, 64, 3, 3)).astype(np.float16),
        **arrays)
    save_external(model, tmp_path / "m.onnx")
    return model


def test_fuse_defers_the_range_check_of_external_weights_to_the_write(tmp_path):
    """fuse_to_write records the overflowing fold as folded (its weight was not read to check it)
    and writing it raises DeferredOverflow; fuse keeps it, with its reason."""
    from bnfold import Reason, fuse
    from bnfold.fold import fuse_to_write
    from bnfold.numerics import DeferredOverflow

    _overflowing_external_model(tmp_path)
    optimistic = fuse_to_write(tmp_path / "m.onnx")
    assert len(optimistic.folded) == 2
    with pytest.raises(DeferredOverflow):
        optimistic.save(tmp_path / "out.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.onnx"]  # nothing left behind
    checked = fuse(tmp_path / "m.onnx")
    assert [r.reason for r in checked.kept] == [Reason.OVERFLOW]


def test_an_overflowing_fold_into_external_data_is_kept_with_its_reason(tmp_path):
    """fuse writes with range checks deferred; an overflow found while writing means folding
    again with the checks: the BN is kept (OVERFLOW), the other folded, values as numpy's."""
    import json

    model = _overflowing_external_model(tmp_path)
    report = tmp_path / "r.json"
    res = CliRunner().invoke(main, ["fuse", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out.onnx"),
                                    "--report", str(report), "--no-verify"])
    assert res.exit_code == 0, res.output
    records = json.loads(report.read_text())["records"]
    assert [(r["folded"], r["reason"]) for r in records] == [(True, None), (False, "OVERFLOW")], records
    w = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    got = _weights(tmp_path / "out.onnx")
    np.testing.assert_array_equal(got["W"], w["W"])  # untouched
    scale = w["bs"].astype(np.float64) / np.sqrt(w["bv"].astype(np.float64) + 1e-5)
    expected = (w["U"].astype(np.float64) * scale[:, None, None, None]).astype(np.float16)
    folded = next(v for k, v in got.items() if v.shape == (64, 64, 3, 3) and k != "W")
    np.testing.assert_array_equal(folded, expected)
    assert bn_count(onnx.load(str(tmp_path / "out.onnx"))) == 1


@pytest.mark.parametrize("ending", ["done", "error"])
def test_a_stopped_consumer_never_leaves_the_prefetch_worker_waiting(ending):
    """The writer stops reading (Ctrl-C, a write error) while the queue is full and the worker
    has one last item to hand over (the end, or an error): closing must not wait forever (a user
    trial saw Ctrl-C hang a 3 GB fold until a second Ctrl-C)."""
    import threading
    import time

    from bnfold.modelio.external import _prefetched

    def blocks():
        yield np.zeros(1)
        yield np.ones(1)
        if ending == "error":
            raise OSError("disk full")

    gen = _prefetched(blocks(), 1)
    assert next(gen)[0] == 0
    time.sleep(0.3)  # the worker fills the queue with the second block and waits to hand over the last item
    closer = threading.Thread(target=gen.close, daemon=True)
    closer.start()
    closer.join(5)
    assert not closer.is_alive(), "closing the prefetching generator hangs"
