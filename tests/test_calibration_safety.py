"""insert and recalibrate refuse what would give wrong or useless results (issue #11).

Every refusal is checked through the CLI: exit 2, one line naming what is wrong, and
no file written or changed in the folder.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from bnfold.cli import main
from conftest import MODELS, build, rand


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def snapshot(folder: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def refused(res, *needles: str) -> str:
    """Assert exit 2 with one error line (no traceback) holding every needle; return it."""
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("bnfold: error: "), res.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def work(tmp_path):
    shutil.copy(MODELS / "resnet_mini.onnx", tmp_path / "m.onnx")
    shutil.copy(MODELS / "mlp_bn1d.onnx", tmp_path / "mlp.onnx")
    np.savez(tmp_path / "cal.npz", input=rand(16, 3, 32, 32, seed=3))
    np.savez(tmp_path / "mlp.npz", input=rand(16, 64, seed=3))
    return tmp_path


# -- (3) non-finite data and activations -------------------------------------------------------

@pytest.mark.parametrize("args", [["insert", "--mode", "normalize", "--exact"], ["recalibrate", "--exact"]])
def test_statistics_too_large_for_the_parameter_dtype_are_refused(work, args):
    """Data of scale 1e30 is finite in float32, its variance (1e60) is not: it was written as inf
    (every output 0) with exit 0 and a numpy RuntimeWarning (found by a new-user trial)."""
    np.savez(work / "huge.npz", input=rand(16, 3, 32, 32, seed=3) * np.float32(1e30))
    before = snapshot(work)
    command, *options = args
    res = cli(command, work / "m.onnx", "--calibration", work / "huge.npz", "-o", work / "out.onnx", *options)
    refused(res, "of BatchNormalization '", "beyond the range of float32", "m.onnx")
    assert snapshot(work) == before


@pytest.mark.parametrize("command", ["insert", "recalibrate"])
def test_nan_in_calibration_data_is_refused_naming_file_array_and_sample(work, command):
    x = rand(16, 3, 32, 32, seed=3)
    x[11, 2, 5, 7] = np.nan
    np.savez(work / "bad.npz", input=x)
    before = snapshot(work)
    line = refused(cli(command, work / "m.onnx", "--calibration", work / "bad.npz"),
                   "bad.npz", "'input'", "sample 11", "nan")
    assert "finite" in line
    assert snapshot(work) == before


def test_inf_in_a_folder_chunk_names_that_file(work):
    (work / "d").mkdir()
    x = rand(8, 64, seed=4)
    np.save(work / "d" / "a.npy", x)
    x[3, 0] = -np.inf
    np.save(work / "d" / "b.npy", x)
    refused(cli("recalibrate", work / "mlp.onnx", "--calibration", work / "d"), "b.npy", "sample 3", "inf")


def test_non_finite_activations_are_refused_naming_the_tensor(tmp_path):
    # finite data, but the Gemm overflows float32: the BN after it would get inf/NaN statistics
    model = build("""<ir_version: 8, opset_import: ["" : 15]>
    g (float[N,4] x) => (float[N,3] y) { h = Gemm (x, W)  y = BatchNormalization (h, s, b, m, v) }""",
                  W=np.full((4, 3), 1e30, np.float32), s=np.ones(3, np.float32), b=np.zeros(3, np.float32),
                  m=np.zeros(3, np.float32), v=np.ones(3, np.float32))
    onnx.save(model, tmp_path / "big.onnx")
    np.savez(tmp_path / "cal.npz", x=np.full((8, 4), 1e10, np.float32))
    before = snapshot(tmp_path)
    refused(cli("recalibrate", tmp_path / "big.onnx", "--calibration", tmp_path / "cal.npz"),
            "big.onnx", "tensor 'h'", "not finite")
    assert snapshot(tmp_path) == before


# -- (4) m < 2 --------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["insert"], ["recalibrate", "--exact"]])
def test_batch_of_one_with_2d_activations_is_refused(work, args):
    before = snapshot(work)
    refused(cli(*args, work / "mlp.onnx", "--calibration", work / "mlp.npz", "--batch-size", "1"),
            "m = 1", "--batch-size")
    assert snapshot(work) == before


def test_fixed_batch_of_one_with_a_2d_head_names_the_op_to_leave_out(tmp_path):
    """A model exported with batch 1 (as torch exports usually are) and a Gemm head: insert asks for
    --batch-size 1, then the head's [1, C] output has m = 1. The refusal must not only repeat "use
    --batch-size 2": it names the op, and leaving that op out works."""
    model = build("""<ir_version: 8, opset_import: ["" : 15]>
    g (float[1,2,3,3] x) => (float[1,4] y) {
        c = Conv <kernel_shape = [1, 1]> (x, W)
        f = Flatten (c)
        y = Gemm <transB = 1> (f, G)
    }""", W=rand(2, 2, 1, 1), G=rand(4, 18))
    for node, name in zip(model.graph.node, ["conv", "flat", "head"]):
        node.name = name
    onnx.save(model, tmp_path / "one.onnx")
    np.savez(tmp_path / "d.npz", x=rand(6, 2, 3, 3))
    before = snapshot(tmp_path)
    refused(cli("insert", tmp_path / "one.onnx", "--calibration", tmp_path / "d.npz", "--batch-size", "1",
                "-o", tmp_path / "out.onnx"),
            "one.onnx", "m = 1", "Gemm 'head'", "fixed at 1", "--exclude")
    assert snapshot(tmp_path) == before
    res = cli("insert", tmp_path / "one.onnx", "--calibration", tmp_path / "d.npz", "--batch-size", "1",
              "--exclude", "head", "-o", tmp_path / "out.onnx")
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("batch_size", [0, -3, 2.5, True])
@pytest.mark.parametrize("command", ["insert", "recalibrate"])
def test_library_batch_size_that_is_not_a_count_is_refused_before_any_work(work, command, batch_size):
    """The CLI's IntRange refuses these; the library let 0 through to ONNX Runtime ("cannot reshape
    {0,10}") or to "m = 0"."""
    from bnfold.errors import BnfoldError
    from bnfold.insert import insert, recalibrate

    data = [{"input": rand(8, 3, 32, 32)}]
    with pytest.raises(BnfoldError, match="batch size .*at least 1"):
        if command == "insert":
            insert(work / "m.onnx", calibration=data, batch_size=batch_size)
        else:
            recalibrate(work / "m.onnx", data, batch_size=batch_size)


def test_batch_of_one_with_spatial_activations_is_fine_where_nothing_normalises_per_batch(work):
    # m = N x H x W >= 2 even for one sample: measured as they are, or with final statistics upstream
    for args in (["recalibrate", "--exact"], ["insert", "--op", "Conv"]):
        res = cli(*args, work / "m.onnx", "--calibration", work / "cal.npz", "--batch-size", "1", "-o",
                  work / "out.onnx")
        assert res.exit_code == 0, res.output


@pytest.mark.parametrize("model, data", [("m.onnx", "cal.npz"), ("mlp.onnx", "mlp.npz")])
@pytest.mark.parametrize("command", [["recalibrate"], ["insert", "--mode", "normalize"]])
def test_batch_of_one_under_batch_statistics_is_refused_saying_why_and_what_works(work, model, data, command):
    # the default method would normalise every sample with its own statistics (instance norm), even where
    # spatial positions give m >= 2: refused before any pass, naming what works
    before = snapshot(work)
    refused(cli(command[0], work / model, *command[1:], "--calibration", work / data, "--batch-size", "1"),
            model, "--batch-size 1", "instance normalisation", "--batch-size 8 or more", "--exact")
    assert snapshot(work) == before


def test_final_batch_of_one_under_batch_statistics_is_refused(work):
    np.savez(work / "odd.npz", input=rand(9, 3, 32, 32, seed=5))
    refused(cli("recalibrate", work / "m.onnx", "--calibration", work / "odd.npz", "--batch-size", "4"),
            "odd.npz", "holds 1 sample", "instance normalisation", "no final batch of one")
    res = cli("recalibrate", work / "m.onnx", "--calibration", work / "odd.npz", "--batch-size", "4", "--exact")
    assert res.exit_code == 0, res.output


def test_fixed_batch_of_one_under_batch_statistics_asks_for_exact(tmp_path):
    model = build("""<ir_version: 8, opset_import: ["" : 15]>
    g (float[1,2,3,3] x) => (float[1,2,3,3] y) { y = BatchNormalization (x, s, b, m, v) }""",
                  s=np.ones(2, np.float32), b=np.zeros(2, np.float32), m=np.zeros(2, np.float32),
                  v=np.ones(2, np.float32))
    onnx.save(model, tmp_path / "one.onnx")
    np.savez(tmp_path / "d.npz", x=rand(4, 2, 3, 3))
    refused(cli("recalibrate", tmp_path / "one.onnx", "--calibration", tmp_path / "d.npz"),
            "one.onnx", "exactly 1 sample", "--batch-size 1 --exact")
    res = cli("recalibrate", tmp_path / "one.onnx", "--calibration", tmp_path / "d.npz", "--batch-size", "1",
              "--exact", "-o", tmp_path / "r.onnx")
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("value, needles", [("1", ["momentum 1", "start values", "[0, 1)"]),
                                            ("1.5", ["momentum 1.5", "[0, 1)"]),
                                            ("-0.1", ["momentum -0.1", "[0, 1)"])])
@pytest.mark.parametrize("command", ["insert", "recalibrate"])
def test_momentum_outside_zero_to_one_is_refused_in_one_line(work, command, value, needles):
    before = snapshot(work)
    refused(cli(command, work / "m.onnx", "--calibration", work / "cal.npz", "--estimator", "momentum",
                "--momentum", value), *needles)
    assert snapshot(work) == before


# -- (5) momentum with few batches ---------------------------------------------------------

def test_momentum_with_few_batches_warns_with_the_weight_of_the_data(work):
    res = CliRunner().invoke(main, ["recalibrate", str(work / "m.onnx"), "--calibration", str(work / "cal.npz"),
                                    "--batch-size", "8", "--estimator", "momentum", "--json"])
    assert res.exit_code == 0, res.output
    assert "warning" in res.stderr and "2.0%" in res.stderr and "mean 0, var 1" in res.stderr
    res = CliRunner().invoke(main, ["recalibrate", str(work / "m.onnx"), "--calibration", str(work / "cal.npz"),
                                    "--batch-size", "8", "--estimator", "momentum", "--momentum", "0.001",
                                    "-o", str(work / "b.onnx")])
    assert res.exit_code == 0 and "warning" not in res.stderr


# -- (6) external data kept ---------------------------------------------------------------

@pytest.mark.parametrize("command", ["insert", "recalibrate"])
def test_external_data_input_gives_external_data_output(work, command):
    model = onnx.load(str(work / "m.onnx"))
    ext = work / "ext"
    ext.mkdir()
    onnx.save(model, str(ext / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.weights", size_threshold=0)
    out = work / "out"
    out.mkdir()
    res = cli(command, ext / "m.onnx", "--calibration", work / "cal.npz", "-o", out / "r.onnx")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["r.onnx", "r.onnx.data"]
    assert (out / "r.onnx").stat().st_size < (out / "r.onnx.data").stat().st_size
    onnx.checker.check_model(str(out / "r.onnx"))


# -- (8) bad options: exit 2, one line, nothing written ----------------------------------

@pytest.mark.parametrize("args, needles", [
    (["--node", "["], ["--node '['", "regular expression"]),
    (["--exclude", "(x"], ["--exclude", "regular expression"]),
    (["--op", "NoSuchOp"], ["NoSuchOp is not a supported host op", "Conv, ConvTranspose"]),
    (["--op", "conv"], ["did you mean Conv?"]),
    (["--op", "Relu"], ["Relu is not a supported host op", "Gemm"]),
    (["--node", "no_such_node"], ["m.onnx", "matching --node 'no_such_node'"]),
    (["--estimator", "momentum"], ["--estimator", "--calibration"]),
    (["--mode", "normalize"], ["--mode", "--calibration"]),
    (["--epsilon", "-1"], ["epsilon -1", "positive"]),
    (["--epsilon", "0"], ["epsilon 0", "positive"]),
])
def test_bad_insert_options_are_refused(work, args, needles):
    before = snapshot(work)
    refused(cli("insert", work / "m.onnx", *args), *needles)
    assert snapshot(work) == before


def test_insert_where_every_op_is_refused_writes_nothing(tmp_path):
    model = build("""<ir_version: 8, opset_import: ["" : 15]>
    g (float[2,4,5] t) => (float[2,4,6] z) { z = MatMul (t, W) }""", W=rand(5, 6))
    onnx.save(model, tmp_path / "mm.onnx")
    before = snapshot(tmp_path)
    refused(cli("insert", tmp_path / "mm.onnx"), "no BatchNormalization inserted", "CHANNEL_AXIS_MISMATCH")
    assert snapshot(tmp_path) == before


def test_recalibrate_without_bns_is_refused(work):
    shutil.copy(MODELS / "resnet_mini.onnx", work / "x.onnx")
    res = cli("fuse", work / "x.onnx", "-o", work / "nobn.onnx", "--no-verify")
    assert res.exit_code == 0, res.output
    before = snapshot(work)
    refused(cli("recalibrate", work / "nobn.onnx", "--calibration", work / "cal.npz"),
            "nobn.onnx", "no inference BatchNormalization")
    assert snapshot(work) == before


# -- (9) messages name the right thing ---------------------------------------------------

def test_shape_mismatch_names_model_and_data_file(work):
    np.savez(work / "small.npz", input=rand(4, 3, 16, 16))
    line = refused(cli("recalibrate", work / "m.onnx", "--calibration", work / "small.npz"),
                   "small.npz", "m.onnx", "[4, 3, 16, 16]")
    assert "probe" not in line and "bnfold-calibrate" not in line


def test_empty_npz_is_named(work):
    np.savez(work / "empty.npz")
    refused(cli("recalibrate", work / "m.onnx", "--calibration", work / "empty.npz"), "empty.npz", "empty .npz")


def test_zero_sample_array_is_named(work):
    np.savez(work / "zero.npz", input=np.zeros((0, 3, 32, 32), np.float32))
    refused(cli("recalibrate", work / "m.onnx", "--calibration", work / "zero.npz"), "zero.npz", "no sample")


@pytest.mark.parametrize("damage", ["truncated", "bad crc", "bad deflate"])
def test_a_damaged_npz_is_one_line_not_an_internal_error(work, damage):
    """zipfile's BadZipFile (truncated, CRC mismatch) and zlib's error (savez_compressed) are not
    OSError/ValueError: they came out as exit 3, "a bug in bnfold"."""
    path = work / "bad.npz"
    if damage == "bad deflate":
        np.savez_compressed(path, input=rand(8, 3, 32, 32, seed=4))
    else:
        np.savez(path, input=rand(8, 3, 32, 32, seed=4))
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[:200]
    else:
        mid = len(data) // 2
        data[mid:mid + 64] = bytes(64)
    path.write_bytes(bytes(data))
    before = snapshot(work)
    refused(cli("insert", work / "m.onnx", "--calibration", path, "-o", work / "out.onnx"),
            "bad.npz", "cannot be read as calibration data")
    assert snapshot(work) == before


def test_a_file_that_is_not_npz_gets_no_pickle_hint(work):
    (work / "notes.npz").write_text("these are not arrays\n")
    line = refused(cli("recalibrate", work / "m.onnx", "--calibration", work / "notes.npz"),
                   "notes.npz", "neither a .npz nor a .npy")
    assert "pickle" not in line


# -- output safety --------------------------------------------------------------------------

def test_output_onto_any_input_file_is_refused(work):
    model = onnx.load(str(work / "m.onnx"))
    ext = work / "ext"
    ext.mkdir()
    onnx.save(model, str(ext / "m.onnx"), save_as_external_data=True, location="m.weights", size_threshold=0)
    os.symlink(work / "m.onnx", work / "link.onnx")
    os.link(work / "m.onnx", work / "hard.onnx")
    for src, out in ((work / "m.onnx", work / "m.onnx"), (work / "m.onnx", work / "link.onnx"),
                     (work / "m.onnx", work / "hard.onnx"), (ext / "m.onnx", ext / "m.weights"),
                     (work / "m.onnx", work / "cal.npz")):
        before = {p: p.read_bytes() for p in (work / "m.onnx", ext / "m.weights", work / "cal.npz")}
        refused(cli("recalibrate", src, "--calibration", work / "cal.npz", "-o", out), "output path")
        if out.suffix == ".onnx" or out.name.endswith(".weights"):  # insert without data reads no .npz
            refused(cli("insert", src, "-o", out), "output path")
        assert {p: p.read_bytes() for p in before} == before


def test_wrong_model_path_and_typo_in_option_value(work):
    refused(cli("recalibrate", work / "nope.onnx", "--calibration", work / "cal.npz"), "nope.onnx", "no such file")
    res = cli("insert", work / "m.onnx", "--calibration", work / "cal.npz", "--estimator", "populaton")
    assert res.exit_code == 2 and "populaton" in res.output
    assert not (work / "m.bn.onnx").exists()


# -- interruption -------------------------------------------------------------------------

@pytest.mark.parametrize("exact", [False, True])
def test_ctrl_c_during_calibration_leaves_nothing_behind(work, monkeypatch, exact):
    import tempfile

    from bnfold.insert import recalibrate

    scratch = work / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the probe model goes

    def interrupt(samples: int, k: int, passes: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        recalibrate(work / "m.onnx", work / "cal.npz", batch_size=8, exact=exact, progress=interrupt)
    assert list(scratch.iterdir()) == []


def test_fixed_batch_dimension_asks_for_the_right_batch_size(tmp_path):
    model = build("""<ir_version: 8, opset_import: ["" : 15]>
    g (float[2,4] x) => (float[2,3] y) { h = Gemm (x, W)  y = BatchNormalization (h, s, b, m, v) }""",
                  W=rand(4, 3), s=np.ones(3, np.float32), b=np.zeros(3, np.float32), m=np.zeros(3, np.float32),
                  v=np.ones(3, np.float32))
    onnx.save(model, tmp_path / "fixed.onnx")
    np.savez(tmp_path / "odd.npz", x=rand(5, 4))
    refused(cli("recalibrate", tmp_path / "fixed.onnx", "--calibration", tmp_path / "odd.npz"),
            "fixed.onnx", "exactly 2", "--batch-size 2")
    refused(cli("recalibrate", tmp_path / "fixed.onnx", "--calibration", tmp_path / "odd.npz", "--batch-size", "2"),
            "holds 1", "multiple of 2")
    np.savez(tmp_path / "even.npz", x=rand(6, 4))
    res = cli("recalibrate", tmp_path / "fixed.onnx", "--calibration", tmp_path / "even.npz", "--batch-size", "2")
    assert res.exit_code == 0, res.output
