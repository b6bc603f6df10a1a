"""Hostile and broken input: exit 2, one line naming the file and the problem, no traceback,
every input byte untouched."""
from __future__ import annotations

import os
import random
import shutil
import threading

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto

from bnfold.modelio import load, write
from bnfold.cli import main
from conftest import MODELS, ROOT


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


@pytest.mark.parametrize("name", ["fc1.bias", "fc2.weight"])  # small, and large enough to be left in the file
def test_tensor_data_shorter_than_its_dims(tmp_path, name):
    model = onnx.load(str(MODELS / "mlp_bn1d.onnx"))
    t = next(t for t in model.graph.initializer if t.name == name)
    t.raw_data = t.raw_data[:len(t.raw_data) - 10]
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    res = run("fuse", path, "--no-verify")
    assert_refused(res, tmp_path / "m.fused.onnx", name, "dims call for")
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


# -- a careless user, every command ----------------------------------------------------------------

def files_under(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder with a model and calibration data, as the current directory (where an empty
    path would point)."""
    shutil.copy(MODELS / "resnet_mini.onnx", tmp_path / "m.onnx")
    np.savez(tmp_path / "cal.npz", input=np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def usage_refused(res):
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnfold: error: "), res.output
    return lines[0]


@pytest.mark.parametrize("args", [
    ("fuse", ""), ("check", ""), ("inspect", ""), ("insert", ""), ("verify", "", "m.onnx"),
    ("recalibrate", "", "--calibration", "cal.npz"), ("recalibrate", "m.onnx", "--calibration", ""),
    ("fuse", "m.onnx", "-o", ""), ("fuse", "m.onnx", "--out-dir", ""), ("insert", "m.onnx", "--calibration", ""),
    ("verify", "m.onnx", "m.onnx", "--inputs", ""), ("check", "m.onnx", "--report", ""),
])
def test_an_empty_path_is_refused_not_taken_for_the_current_folder(workdir, args):
    """`bnfold fuse "$MODEL"` with MODEL unset must not fold every model in the current folder."""
    before = files_under(workdir)
    assert "an empty path" in usage_refused(run(*args))
    assert files_under(workdir) == before


@pytest.mark.parametrize("args", [
    ("verify", "m.onnx", "m.onnx", "--rtol", "nan"), ("verify", "m.onnx", "m.onnx", "--atol", "-1"),
    ("fuse", "m.onnx", "--rtol", "inf"), ("check", "m.onnx", "--exact-budget", "nan"),
    ("verify", "m.onnx", "m.onnx", "--output-tol", "logits=nan:"),
    ("verify", "m.onnx", "m.onnx", "--output-tol", "logits=:-1"),
    ("recalibrate", "m.onnx", "--calibration", "cal.npz", "--estimator", "momentum", "--momentum", "nan"),
    ("insert", "m.onnx", "--epsilon", "nan"), ("insert", "m.onnx", "--epsilon", "0"),
])
def test_a_tolerance_or_parameter_that_is_not_a_finite_sane_number_is_refused(workdir, args):
    """A NaN tolerance would pass any difference; a NaN momentum would write NaN statistics."""
    before = files_under(workdir)
    usage_refused(run(*args))
    assert files_under(workdir) == before


@pytest.mark.parametrize("content,needle", [
    (None, "is a directory"), (b"", "is empty"), (b"hello, I am text", "is neither a .npz nor a .npy file"),
])
def test_verify_inputs_that_are_not_numpy_files(workdir, content, needle):
    bad = workdir / "in.npz"
    if content is None:
        bad.mkdir()
    else:
        bad.write_bytes(content)
    line = usage_refused(run("verify", "m.onnx", "m.onnx", "--inputs", bad))
    assert str(bad) in line and needle in line and "allow_pickle" not in line


@pytest.mark.parametrize("args,target", [
    (("fuse", "m.onnx", "-o", "OUT/x.onnx"), "OUT/x.onnx"),
    (("insert", "m.onnx", "-o", "OUT/x.onnx"), "OUT/x.onnx"),
    (("recalibrate", "m.onnx", "--calibration", "cal.npz", "-o", "OUT/x.onnx"), "OUT/x.onnx"),
    (("fuse", "m.onnx", "-o", "y.onnx", "--report", "OUT/r.json"), "OUT/r.json"),
    (("check", "m.onnx", "--junit", "OUT/j.xml"), "OUT/j.xml"),
])
def test_a_folder_that_looks_writable_but_is_not(workdir, monkeypatch, args, target):
    """Like /proc, or a read-only mount seen by root: os.access says yes, creating a file fails.
    One line naming the file, exit 2 (not an internal error), and nothing written anywhere,
    not even the model output when only its report cannot be written."""
    import errno
    import tempfile

    out = workdir / "OUT"
    out.mkdir()

    def refuse(mk):
        def guarded(*a, dir=None, **kw):
            if dir is not None and os.path.samefile(dir, out):
                raise OSError(errno.EROFS, "Read-only file system")
            return mk(*a, dir=dir, **kw)
        return guarded

    monkeypatch.setattr(tempfile, "mkdtemp", refuse(tempfile.mkdtemp))
    monkeypatch.setattr(tempfile, "mkstemp", refuse(tempfile.mkstemp))
    before = files_under(workdir)
    line = usage_refused(run(*[a.replace("OUT", str(out)) for a in args]))
    assert line.startswith(f"bnfold: error: {out / target[4:]}: ") and "Read-only file system" in line
    assert files_under(workdir) == before


def test_check_names_a_missing_model_on_stderr(workdir):
    res = run("check", "nope.onnx")
    assert res.exit_code == 2 and res.stderr == "bnfold: error: nope.onnx: no such file\n"


@pytest.mark.parametrize("command", ["insert", "recalibrate"])
def test_ctrl_c_while_insert_or_recalibrate_renames_its_output_is_held(workdir, monkeypatch, command, sigint_default):
    import signal

    real = write.StagedModel.commit

    def interrupted_commit(self):
        if self.target.name == "out.onnx":  # not a temporary model calibration may write
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C between staging and the renames
        real(self)

    monkeypatch.setattr(write.StagedModel, "commit", interrupted_commit)
    out = workdir / "out.onnx"
    args = [command, "m.onnx", "-o", out] + (["--calibration", "cal.npz"] if command == "recalibrate" else [])
    res = run(*args)
    assert res.exit_code == 130, res.output
    assert res.output == f"bnfold: error: interrupted; {out} was written, complete, before it stopped\n"
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert sorted(p.name for p in workdir.iterdir()) == ["cal.npz", "m.onnx", "out.onnx"]  # no staged folder


@pytest.mark.parametrize("args", [
    ("fuse", "m.onnx"), ("inspect", "m.onnx"), ("check", "m.onnx"), ("verify", "m.onnx", "m.onnx"),
    ("insert", "m.onnx"), ("recalibrate", "m.onnx", "--calibration", "cal.npz"),
])
def test_an_unreadable_model_is_one_line_for_every_command(workdir, monkeypatch, args):
    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(load, "open", denied, raising=False)  # root reads anything: simulate it
    before = files_under(workdir)
    res = run(*args)
    assert res.exit_code == 2 and res.stderr == "bnfold: error: m.onnx: cannot be read (Permission denied)\n"
    assert args[0] == "check" or res.stdout == ""  # check also shows its summary table
    assert files_under(workdir) == before


@pytest.mark.parametrize("args", [
    ("fuse", "{}"), ("inspect", "{}"), ("check", "{}"), ("verify", "m.onnx", "{}"), ("insert", "{}"),
    ("recalibrate", "{}", "--calibration", "cal.npz"), ("fuse", "m.onnx", "-o", "{}", "--no-verify")])
def test_a_symlink_loop_is_one_line_not_a_bug(workdir, args):
    """A symlink loop raised RuntimeError from Path.resolve: exit 3, "a bug in bnfold"."""
    os.symlink("x.onnx", workdir / "x.onnx")
    before = files_under(workdir)
    res = run(*(a.format("x.onnx") for a in args))
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("bnfold: error: x.onnx: ") and len(res.stderr.splitlines()) == 1, res.stderr
    assert "loop" in res.stderr
    assert files_under(workdir) == before


def test_a_model_read_from_a_pipe_still_works(workdir):
    """Process substitution (`bnfold inspect <(curl ...)`) hands bnfold a pipe: it is read like a file."""
    os.mkfifo(workdir / "p.onnx")
    writer = threading.Thread(target=lambda: (workdir / "p.onnx").write_bytes((workdir / "m.onnx").read_bytes()))
    writer.start()
    res = run("inspect", workdir / "p.onnx")
    writer.join()
    assert res.exit_code == 0 and "13 -> 0" in res.output, res.output


def test_external_data_behind_a_symlink_loop_is_refused(tmp_path):
    path = with_external(tmp_path, "w.bin")
    os.symlink("w.bin", tmp_path / "w.bin")
    assert_refused(run("inspect", path), path, "symbolic link loop")


def test_unreadable_verify_inputs_are_one_line(workdir, monkeypatch):
    from bnfold import inputs

    np.savez(workdir / "in.npz", input=np.zeros((2, 3, 32, 32), np.float32))

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(inputs, "open", denied, raising=False)
    line = usage_refused(run("verify", "m.onnx", "m.onnx", "--inputs", "in.npz"))
    assert line == "bnfold: error: in.npz: cannot be read (Permission denied)"


@pytest.mark.parametrize("kind", ["fifo", "fd link", "fifo report", "fifo data"])
def test_outputs_onto_special_files_are_refused_and_left_alone(tmp_path, kind):
    """-o or --report onto a FIFO, or onto a link to an open file descriptor (as /dev/stdout is),
    or a FIFO where the output's external data would go: the temporary-file-and-rename write
    would replace the node itself, so each is refused (exit 2, one line) and stays as it was."""
    import os
    import stat

    from click.testing import CliRunner

    from bnfold.cli import main

    node = tmp_path / ("out.onnx.data" if kind == "fifo data" else "node")
    if kind == "fd link":
        os.symlink("/proc/self/fd/1", node)
    else:
        os.mkfifo(node)
    model = str(ROOT / "models" / "resnet_mini.onnx")
    if kind == "fifo report":
        args = ["fuse", model, "-o", str(tmp_path / "m.onnx"), "--report", str(node), "-q"]
    elif kind == "fifo data":  # a model with external data writes <output>.data
        import onnx

        from conftest import bn_params, build, rand

        m = build("""<ir_version: 8, opset_import: ["" : 15]>
        g (float[N,64,6,6] x) => (float[N,64,6,6] y) {
            c = Conv <pads = [1, 1, 1, 1]> (x, W)
            y = BatchNormalization (c, s, b, m, v)
        }""", W=rand(64, 64, 3, 3), **bn_params(64, 1))
        (tmp_path / "src").mkdir()
        onnx.save_model(m, str(tmp_path / "src" / "m.onnx"), save_as_external_data=True, location="m.bin",
                        size_threshold=1024)
        args = ["fuse", str(tmp_path / "src" / "m.onnx"), "-o", str(tmp_path / "out.onnx"), "-q"]
    else:
        args = ["fuse", model, "-o", str(node), "-q"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    assert "renames it into place" in res.stderr and "Traceback" not in res.output
    if kind == "fd link":
        assert os.path.islink(node) and os.readlink(node) == "/proc/self/fd/1"
    else:
        assert stat.S_ISFIFO(os.lstat(node).st_mode)


def test_a_model_from_a_pipe_is_refused_when_it_must_be_read_twice(tmp_path):
    """fuse with verification reads the model again to verify it, which a pipe cannot give: one
    line and exit 2 before reading anything; with --no-verify the pipe is folded."""
    import os
    import threading

    from click.testing import CliRunner

    from bnfold.cli import main

    fifo = tmp_path / "model.pipe"
    os.mkfifo(fifo)
    data = (ROOT / "models" / "resnet_mini.onnx").read_bytes()

    def feed() -> None:
        with open(fifo, "wb") as f:
            f.write(data)

    res = CliRunner().invoke(main, ["fuse", str(fifo), "-o", str(tmp_path / "a.onnx"), "-q"])
    assert res.exit_code == 2 and "pipe cannot give" in res.stderr, res.output
    assert not (tmp_path / "a.onnx").exists()
    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    res = CliRunner().invoke(main, ["fuse", str(fifo), "-o", str(tmp_path / "b.onnx"), "-q", "--no-verify"])
    writer.join(timeout=30)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "b.onnx").exists()


@pytest.mark.parametrize("external", [False, True])
def test_corrupt_weights_give_reasons_and_no_numpy_warnings(tmp_path, external):
    """Random bytes in a weights file hold signalling NaNs, infs and huge values: each BN they
    touch is kept with its reason (never exit 3) and numpy's RuntimeWarnings do not reach the
    user's terminal (they came from casts, spacing and sqrt of those values)."""
    import warnings

    from onnx import numpy_helper
    from onnx.external_data_helper import convert_model_to_external_data

    model = onnx.load(str(MODELS / "resnet_mini.onnx"))
    rng = np.random.default_rng(0)
    for t in model.graph.initializer:
        if t.data_type == TensorProto.FLOAT and len(t.raw_data) > 256:
            bits = rng.integers(0, 2**32, size=len(t.raw_data) // 4, dtype=np.uint32)
            bits[:4] = [0x7FA00000, 0xFFA00001, 0x7F800000, 0x7F7FFFFF]  # sNaN, -sNaN, inf, max float32
            t.raw_data = bits.tobytes()
        elif t.name.endswith("running_var") or "var" in t.name:
            arr = numpy_helper.to_array(t).copy()
            arr.view(np.uint32)[0] = 0x7FA00000  # a signalling NaN variance
            t.raw_data = arr.tobytes()
    if external:
        convert_model_to_external_data(model, all_tensors_to_one_file=True, location="m.data", size_threshold=0)
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = run("fuse", path, "-o", tmp_path / "out.onnx")
        res_inspect = run("inspect", path)
    assert res.exit_code in (0, 1) and res_inspect.exit_code == 0, res.output + res_inspect.output
    assert "INVALID_PARAMETERS" in res_inspect.output or "OVERFLOW" in res_inspect.output, res_inspect.output
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]
