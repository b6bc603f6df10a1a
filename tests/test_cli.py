"""The command line: outputs, exit codes, messages and JSON, through click's CliRunner."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from bnfold import numerics, runner
from bnfold.cli import main
from bnfold.errors import MissingDependencyError
from conftest import MODELS, ROOT, assert_equivalent, bn_count, check


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "net.onnx"
    shutil.copy(MODELS / "resnet_mini.onnx", path)
    return path


def run(*args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], **kw)


def test_fuse_writes_beside_input_and_leaves_input_untouched(model):
    before = model.read_bytes()
    res = run("fuse", model)
    assert res.exit_code == 0, res.output
    out = model.with_name("net.fused.onnx")
    assert model.read_bytes() == before
    folded = onnx.load(str(out))
    check(folded)
    assert bn_count(folded) == 0
    assert_equivalent(onnx.load(str(model)), folded)
    assert "BatchNormalization 13 -> 0" in res.output and "EQUIVALENT" in res.output
    assert not [p for p in model.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_fuse_output_option_and_in_place(model, tmp_path):
    res = run("fuse", model, "-o", tmp_path / "x.onnx", "--no-verify")
    assert res.exit_code == 0 and (tmp_path / "x.onnx").exists()
    res = run("fuse", model, "--in-place", "--no-verify")
    assert res.exit_code == 0 and bn_count(onnx.load(str(model))) == 0


def test_fuse_refuses_to_overwrite_input(model):
    res = run("fuse", model, "-o", model)
    assert res.exit_code == 2
    assert "output path is the input model" in res.output and "Traceback" not in res.output
    res = run("fuse", model, "-o", model, "--in-place")
    assert res.exit_code == 2


def test_report_json_and_stdout_json(model, tmp_path):
    res = run("fuse", model, "--report", tmp_path / "r.json", "--json")
    assert res.exit_code == 0
    printed = json.loads(res.output)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert printed == saved
    assert set(saved) == {"bnfold_version", "source", "output", "before", "after", "folded", "kept", "records",
                          "verification", "reparameterized"}
    assert saved["before"]["bn_count"] == 13 and saved["after"]["bn_count"] == 0 and saved["folded"] == 13
    rec = saved["records"][0]
    assert set(rec) == {"node", "graph", "folded", "direction", "host", "host_op", "reason", "detail", "why"}
    assert saved["verification"]["equivalent"] is True


def test_inspect_writes_nothing_and_lists_reasons(tmp_path):
    path = tmp_path / "m.onnx"
    model = onnx.load(str(MODELS / "resnet_mini.onnx"))
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    bn.attribute.append(onnx.helper.make_attribute("training_mode", 1))
    path.write_bytes(model.SerializeToString())
    res = run("inspect", path)
    assert res.exit_code == 0
    assert "TRAINING_MODE" in res.output and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@pytest.mark.parametrize("make,message", [
    (lambda p: None, "no such file"),
    (lambda p: p.mkdir(), "is a directory|folder holds no *.onnx file"),
    (lambda p: p.write_bytes(b""), "is empty"),
    (lambda p: p.write_bytes(b"\xff" * 64), "is not an ONNX model"),
    (lambda p: p.write_bytes((MODELS / "resnet_mini.onnx").read_bytes()[:5000]), "is not an ONNX model"),
    (lambda p: p.write_text("hello, I am text\n"), "is not an ONNX model"),
])
@pytest.mark.parametrize("command", ["fuse", "inspect"])
def test_unusable_input_exits_2_with_one_line(tmp_path, make, message, command):
    path = tmp_path / "bad.onnx"
    make(path)
    res = run(command, path)
    assert res.exit_code == 2
    assert res.output.count("\n") == 1 and str(path) in res.output
    assert any(m in res.output for m in message.split("|"))
    assert "Traceback" not in res.output


def test_newer_ir_version_is_refused(tmp_path):
    model = onnx.load(str(MODELS / "mlp_bn1d.onnx"))
    model.ir_version = onnx.IR_VERSION + 1
    path = tmp_path / "new.onnx"
    path.write_bytes(model.SerializeToString())
    res = run("fuse", path)
    assert res.exit_code == 2 and "newer than onnx" in res.output


def test_missing_output_folder(model, tmp_path):
    res = run("fuse", model, "-o", tmp_path / "nope" / "x.onnx")
    assert res.exit_code == 2 and "does not exist" in res.output


def test_failed_verification_writes_nothing_unless_forced(model, monkeypatch):
    real = numerics.bn_affine

    def drop_mean(scale, bias, mean, var, eps):  # a planted fold bug
        return real(scale, bias, np.zeros_like(mean), var, eps)

    monkeypatch.setattr(numerics, "bn_affine", drop_mean)
    out = model.with_name("net.fused.onnx")
    res = run("fuse", model)
    assert res.exit_code == 1 and "not written" in res.output and "NOT EQUIVALENT" in res.output
    assert not out.exists()
    res = run("fuse", model, "--force")  # writes, says so, and still fails the run
    assert res.exit_code == 1 and out.exists() and "written with --force" in res.output


def test_without_onnxruntime_fuse_warns_and_verify_says_how_to_install(model, monkeypatch):
    def missing():
        raise MissingDependencyError(f"ONNX Runtime is not installed: {runner.INSTALL_HINT}")

    monkeypatch.setattr(runner, "ort", missing)
    monkeypatch.setattr(runner, "ORT_MODULE", "onnxruntime_absent")  # what the worker path looks up
    res = run("fuse", model)
    assert res.exit_code == 0 and "not verified" in res.output and "bnfold[cpu]" in res.output
    assert model.with_name("net.fused.onnx").exists()
    res = run("fuse", model, "--verify")
    assert res.exit_code == 2 and "pip install" in res.output
    res = run("verify", model, model)
    assert res.exit_code == 2 and "pip install" in res.output


def test_verify_exit_codes_and_junit(model, tmp_path):
    assert run("fuse", model, "-q").exit_code == 0
    fused = model.with_name("net.fused.onnx")
    res = run("verify", model, fused, "--junit", tmp_path / "j.xml")
    assert res.exit_code == 0 and "EQUIVALENT" in res.output and (tmp_path / "j.xml").exists()
    other = MODELS / "mobilenet_mini.onnx"
    res = run("verify", model, other, "--json", "--localize")
    assert res.exit_code == 1 and json.loads(res.output)["equivalent"] is False
    res = run("verify", model, tmp_path / "missing.onnx")
    assert res.exit_code == 2 and "no such file" in res.output
    res = run("verify", model, fused, "--providers", "tpu")
    assert res.exit_code == 2 and "--providers" in res.output
    res = run("verify", model, fused, "--dim", "oops")
    assert res.exit_code == 2 and "NAME=VALUE" in res.output


def test_help_and_module_entry_point():
    res = run("--help")
    assert res.exit_code == 0 and "fuse" in res.output and "verify" in res.output
    for cmd in ("fuse", "verify", "inspect"):
        assert run(cmd, "--help").exit_code == 0
    proc = subprocess.run([sys.executable, "-m", "bnfold", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and "bnfold" in proc.stdout


def test_the_command_delivers_all_its_output_and_status_through_pipes(tmp_path):
    """The bnfold process skips the interpreter's teardown when it can (os._exit): what it
    printed must still arrive whole, with the command's exit code, and its ONNX Runtime
    worker must be gone with it."""
    import json

    model = ROOT / "models" / "resnet_mini.onnx"
    proc = subprocess.run([sys.executable, "-m", "bnfold", "fuse", str(model), "-o", str(tmp_path / "f.onnx"),
                           "--json"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # block-buffered into a pipe: every byte must be flushed
    assert report["verification"]["equivalent"] is True and report["folded"] == 13
    proc = subprocess.run([sys.executable, "-m", "bnfold", "fuse", str(tmp_path / "missing.onnx")],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().endswith("no such file"), proc.stderr
    unique = tmp_path / "only-this-test.onnx"  # the worker is forked: its command line is bnfold's
    unique.write_bytes(model.read_bytes())
    proc = subprocess.run([sys.executable, "-m", "bnfold", "verify", str(unique), str(unique), "-q"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert str(unique) not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout


def test_help_does_not_import_onnx_or_onnxruntime():
    code = ("import sys; from click.testing import CliRunner; from bnfold.cli import main; "
            "CliRunner().invoke(main, ['fuse', '--help']); "
            "print(sorted(m for m in ('onnx', 'onnxruntime', 'numpy') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


COMMANDS = ["fuse", "inspect", "verify", "check", "insert", "recalibrate"]
CHOICES = {"insert": ["--position", "pre-activaton"], "recalibrate": ["--estimator", "momentun"],
           "fuse": ["--providers", "cdua"], "check": ["--providers", "cdua"], "verify": ["--providers", "cdua"]}


def usage_cases():
    for cmd in COMMANDS:
        extra = {"verify": ["a.onnx", "b.onnx"], "recalibrate": ["a.onnx", "--calibration", "d.npz"]}
        args = extra.get(cmd, ["a.onnx"])
        yield cmd, [cmd, *args, "--no-such-option"], "no such option '--no-such-option'"
        yield cmd, [cmd], "missing argument"
        if cmd in CHOICES:
            yield cmd, [cmd, *args, *CHOICES[cmd]], "invalid value for '" + CHOICES[cmd][0] + "'"
        if cmd != "verify":
            yield cmd, [cmd, *args, "-q", "-v"], "use -q or -v, not both"
    yield None, ["no-such-command"], "no such command 'no-such-command'"
    yield None, ["--no-such-option"], "no such option"
    yield "fuse", ["fuse", "a.onnx", "--jobs", "0"], "invalid value for '-j' / '--jobs'"
    for cmd, args in (("fuse", ["a.onnx"]), ("check", ["a.onnx"]), ("verify", ["a.onnx", "b.onnx"])):
        yield cmd, [cmd, *args, "--dim", "N=abc"], "--dim 'N=abc' has an invalid value"
        yield cmd, [cmd, *args, "--dim", "abc"], "--dim 'abc' is not of the form NAME=VALUE"
        yield cmd, [cmd, *args, "--shape", "x=1xq"], "--shape 'x=1xq' has an invalid value"
        for stray in ("1xx3", "1x3x", "1x3,4", "-1x3"):  # were read as 1x3 (empty pieces dropped), 1x3x4, ...
            yield cmd, [cmd, *args, "--shape", f"x={stray}"], \
                f"--shape 'x={stray}' has an invalid value (expected dimensions separated by 'x'"
        yield cmd, [cmd, *args, "--output-tol", "y=abc"], "--output-tol 'y=abc' has an invalid value"
        yield cmd, [cmd, *args, "--seed", "-5"], "invalid value for '--seed'"  # was exit 3 (numpy's ValueError)
        yield cmd, [cmd, *args, "--dim", "N=4", "--dim", "N=5"], "--dim N is given twice"  # the last one won
        yield cmd, [cmd, *args, "--shape", "x=1x3", "--shape", "x=1x4"], "--shape x is given twice"
        yield cmd, [cmd, *args, "--output-tol", "y=1e-3"], "--output-tol 'y=1e-3' has an invalid value"  # rtol?


@pytest.mark.parametrize("cmd,argv,problem", list(usage_cases()))
def test_every_usage_error_is_one_line_naming_the_help(cmd, argv, problem, tmp_path):
    res = CliRunner().invoke(main, argv)  # a.onnx etc. need not exist: usage is checked first
    assert res.exit_code == 2, res.output
    assert res.stdout == ""
    help_cmd = f"bnfold {cmd} --help" if cmd else "bnfold --help"
    assert res.stderr.count("\n") == 1 and "Usage:" not in res.stderr, res.stderr
    assert res.stderr.startswith(f"bnfold: error: {problem}") and res.stderr.endswith(f" (see '{help_cmd}')\n"), \
        res.stderr


def test_an_option_value_typo_names_the_valid_values():
    res = CliRunner().invoke(main, ["verify", "a.onnx", "b.onnx", "--providers", "cdua"])
    assert res.exit_code == 2 and "auto, cpu, cuda, cpu,cuda (did you mean 'cuda'?)" in res.stderr
    res = CliRunner().invoke(main, ["insert", "a.onnx", "--position", "pre"])
    assert res.exit_code == 2 and "'pre-activation', 'post-activation'" in res.stderr
    res = CliRunner().invoke(main, ["fuse", "a.onnx", "--providers", "CPU,cuda", "--help"])
    assert res.exit_code == 0  # case-insensitive, and lists are valid


def test_usage_errors_are_one_line_from_the_installed_entry_point():
    proc = subprocess.run([sys.executable, "-m", "bnfold", "fuse", "--no-such-option"], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr == \
        "bnfold: error: no such option '--no-such-option' (see 'bnfold fuse --help')\n"


@pytest.mark.parametrize("array,problem", [
    (np.zeros((2, 3, 16, 16), np.float32), "array 'input' has shape [2, 3, 16, 16], but the model's input 'input' "
                                           "is [N, 3, 32, 32] (axis 2 must be 32)"),
    (np.zeros((3, 32, 32), np.float32), "(rank 3), but the model's input 'input' is [N, 3, 32, 32] (rank 4)"),
    (np.full((2, 3, 32, 32), np.nan, np.float32), "array 'input' holds NaN or inf (first at index (0, 0, 0, 0)"),
    (np.zeros((2, 3, 32, 32), np.complex64), "array 'input' is complex64, but the model's input 'input' is float32"),
])
@pytest.mark.parametrize("suffix", [".npz", ".npy"])
def test_verify_inputs_that_do_not_fit_name_the_file_and_the_input(model, tmp_path, array, problem, suffix):
    data = tmp_path / f"x{suffix}"
    if suffix == ".npz":
        np.savez(data, input=array)
    else:
        np.save(data, array)
    res = run("verify", model, model, "--inputs", data)
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith(f"bnfold: error: {data}: array 'input' ") and problem in res.stderr
    assert res.stderr.count("\n") == 1 and str(model) not in res.stderr


def help_text(*cmd):
    res = run(*cmd, "--help")
    assert res.exit_code == 0
    return " ".join(res.output.split()).replace("- ", "-")  # undo wrapping at hyphens (site-packages)


def test_help_says_what_each_report_writes_and_what_applies():
    from bnfold.paths import SKIPPED_FOLDER_NAMES

    for cmd in ("fuse", "check"):
        text = help_text(cmd)
        assert "one test case per model" in text and "whatever the outcome" in text  # --junit
        assert '{"models": [...]}' in text  # --report's batch form
        for name in SKIPPED_FOLDER_NAMES | {".git", "virtual environments"}:
            assert name in text, (cmd, name)  # --exclude: what folder searches always skip
        assert "named MODELS and files found in folders alike" in text
    assert "one test case per output and provider" in help_text("verify")
    text = help_text("recalibrate")
    assert "new BN" not in text and "skipped ops" not in text
    assert "with --estimator momentum" in text and "each BN recalibrated" in text


def test_option_without_the_option_it_needs_is_one_grammatical_usage_line(model, tmp_path):
    res = run("insert", model, "--estimator", "momentum")
    assert res.exit_code == 2 and res.stderr.startswith(
        "bnfold: error: --estimator applies only with --calibration") and res.stderr.count("\n") == 1
    res = run("insert", model, "--estimator", "momentum", "--exact")
    assert "--estimator and --exact apply only with --calibration" in res.stderr
    data = tmp_path / "d.npz"
    np.savez(data, input=np.zeros((4, 3, 32, 32), np.float32))
    res = run("recalibrate", model, "--calibration", data, "--momentum", "0.9")
    assert res.exit_code == 2 and "--momentum applies only with --estimator momentum" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "net.onnx"]  # nothing written


def test_exclude_applies_to_models_named_explicitly(tmp_path):
    keep, skip = tmp_path / "keep.onnx", tmp_path / "legacy" / "old.onnx"
    skip.parent.mkdir()
    shutil.copy(MODELS / "mlp_bn1d.onnx", keep)
    shutil.copy(MODELS / "mlp_bn1d.onnx", skip)
    res = run("fuse", keep, skip, "--exclude", "legacy", "--no-verify", "--json")
    assert res.exit_code == 0, res.output
    assert [m["model"] for m in json.loads(res.stdout)["models"]] == [str(keep)]
    assert not skip.with_name("old.fused.onnx").exists()
    res = run("check", skip, "--exclude", "*.onnx")  # pre-commit handing over only excluded files
    assert res.exit_code == 0 and "all 1 model(s) named match --exclude; nothing to do" in res.stderr


@pytest.mark.parametrize("command", ["fuse", "inspect"])
def test_json_on_an_unreadable_model_is_its_outcome(tmp_path, command):
    """A pipeline that parses stdout as JSON gets the status and the error, not an empty string;
    stderr keeps its one line."""
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    res = run(command, bad, "--json")
    assert res.exit_code == 2
    doc = json.loads(res.stdout)
    assert doc["status"] == "unusable" and doc["exit_code"] == 2 and doc["report"] is None
    assert str(bad) in doc["error"] and "not an ONNX model" in doc["error"]
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("bnfold: error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_a_reader_that_stops_early_ends_the_command_quietly(tmp_path):
    """`bnfold fuse m.onnx | head -1`: standard output's reader goes away. The model is still
    written; bnfold stops as a command ended by SIGPIPE does (status 141), with no bug report."""
    import subprocess
    import sys

    out = tmp_path / "m.fused.onnx"
    p = subprocess.Popen([sys.executable, "-m", "bnfold", "fuse", str(ROOT / "models" / "resnet_mini.onnx"), "-o",
                          str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before bnfold prints anything
    err = p.stderr.read().decode()
    assert p.wait() == 141, err
    assert err == ""
    assert out.exists()


@pytest.mark.parametrize("args, both", [(["--help"], False), (["--version"], False), (["fuse", "--help"], False),
                                        (["nosuch"], True), (["fuse", "--bogus", "x"], True),
                                        (["fuse", "missing.onnx"], True)])
def test_help_version_and_errors_into_a_closed_pipe_end_as_sigpipe_would(args, both):
    """`bnfold --help | true` (click catches the broken pipe itself and exited 1, a failure to
    a script) and `bnfold nosuch 2>&1 | true` (a traceback-less exit 1): now 141, as the commands."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written: every write fails
    try:
        p = subprocess.run([sys.executable, "-m", "bnfold", *args], stdout=write,
                           stderr=write if both else subprocess.PIPE, timeout=60)
    finally:
        os.close(write)
    assert p.returncode == 141 and not p.stderr, p.stderr


@pytest.mark.parametrize("command, says", [("verify", "bnfold: error: interrupted\n"),
                                           ("inspect", "bnfold: error: interrupted\n"),
                                           ("fuse", "bnfold: error: interrupted; no model was written\n")])
def test_ctrl_c_says_no_model_was_written_only_where_one_could_have_been(command, says, monkeypatch):
    import bnfold.workflow
    import bnfold.verification

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(bnfold.verification, "verify", stop)
    monkeypatch.setattr(bnfold.workflow, "run_batch", stop)
    monkeypatch.setattr(bnfold.workflow, "inspect_file", stop, raising=False)
    import bnfold.fold
    monkeypatch.setattr(bnfold.fold, "fuse", stop)
    model = MODELS / "resnet_mini.onnx"
    args = {"verify": [model, model], "inspect": [model], "fuse": [model, "--no-verify"]}[command]
    res = run(command, *args)
    assert res.exit_code == 130 and res.stderr == says, res.output


def run_signalled(patch: str, sig: str, argv: list, on_call: int = 1, first: str = ""):
    """Run ``bnfold ARGV`` in a fresh process in which the ``on_call``-th call of ``patch``
    ("module:attribute", the attribute possibly "Class.method") first runs ``first`` (Python, with the
    call's arguments as ``a``) and sends ``sig`` to the process itself, then proceeds."""
    module, _, attr = patch.partition(":")
    owner, _, name = attr.rpartition(".")
    script = "\n".join([
        "import importlib, os, signal, sys",
        f"holder = importlib.import_module({module!r})",
        *([f"holder = holder.{owner}"] if owner else []),
        f"real = getattr(holder, {name!r})",
        "calls = []",
        "def signalled(*a, **k):",
        "    calls.append(1)",
        f"    if len(calls) == {on_call}:",
        f"        {first or 'pass'}",
        f"        os.kill(os.getpid(), signal.{sig})",
        "    return real(*a, **k)",
        f"setattr(holder, {name!r}, signalled)",
        "from bnfold.cli import main",
        "sys.argv = ['bnfold'] + sys.argv[1:]",
        "main()",
    ])
    return subprocess.run([sys.executable, "-c", script, *map(str, argv)], capture_output=True, text=True,
                          timeout=120)


def test_sigterm_stops_like_ctrl_c_leaves_nothing_and_exits_143(tmp_path):
    """`timeout`, `kill` and a cancelled CI job send SIGTERM: the staged output must go (a trial found
    3.9 GB of staging folders left by three such runs), the exit status is 143."""
    out = tmp_path / "out"
    out.mkdir()
    proc = run_signalled("bnfold.modelio.stream:write_model", "SIGTERM",  # after a partial write
                         ["fuse", MODELS / "resnet_mini.onnx", "-o", out / "m.onnx", "--no-verify"],
                         first="a[1].write(b'partial')")
    assert proc.returncode == 143, proc.stderr
    assert "interrupted" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert list(out.iterdir()) == []  # no output, no staging folder


@pytest.mark.parametrize("command", ["fuse", "insert"])
def test_sigterm_while_the_output_is_renamed_into_place_exits_143_with_it_complete(tmp_path, command):
    """The signal is held while the output is renamed into place, then acted on: it was taken for
    Ctrl-C (exit 130) because the held signal's own handler never ran (new-user trial, every time)."""
    out = tmp_path / "m.onnx"
    extra = ["--no-verify"] if command == "fuse" else []
    proc = run_signalled("bnfold.modelio.write:StagedModel.commit", "SIGTERM",
                         [command, MODELS / "resnet_mini.onnx", "-o", out, *extra])
    assert proc.returncode == 143, proc.stderr
    assert "Traceback" not in proc.stderr and str(out) in proc.stderr, proc.stderr
    onnx.checker.check_model(str(out))  # written, complete


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_while_the_command_imports_its_libraries_ends_it_quietly(tmp_path, sig):
    """Before the command has its handlers nothing has started: Ctrl-C or SIGTERM then ends the process
    as the signal does, not with a KeyboardInterrupt traceback from an import (or an abort inside onnx's
    native module initialisation: exits 134 and 139 in a trial). After, Ctrl-C is handled again."""
    script = "\n".join([
        "import builtins, os, signal, sys",
        "real = builtins.__import__",
        "def importing(name, *a, **k):",
        "    if name == 'onnx':",
        f"        os.kill(os.getpid(), signal.{sig})",
        "    return real(name, *a, **k)",
        "builtins.__import__ = importing",
        "sys.argv = ['bnfold', 'fuse', sys.argv[1], '-o', sys.argv[2], '--no-verify']",
        "from bnfold.__main__ import run",
        "run()",
    ])
    out = tmp_path / "o.onnx"
    proc = subprocess.run([sys.executable, "-c", script, str(MODELS / "resnet_mini.onnx"), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -getattr(signal, sig), proc.stderr
    assert proc.stderr == "" and not out.exists(), proc.stderr
    handled = "\n".join(["import signal, sys", "sys.argv = ['bnfold', 'fuse', '--help']",
                         "from bnfold import cli", "from bnfold.__main__ import run",
                         "signal.signal(signal.SIGINT, signal.SIG_DFL)", "cli._take_signals()",
                         "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"])
    proc = subprocess.run([sys.executable, "-c", handled], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "True", proc.stdout + proc.stderr


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_once_the_run_is_over_leaves_its_reports_and_status_as_the_run_was(tmp_path, sig):
    """The run is over when its reports are written: a signal then is held and dropped. A trial saw a
    report saying "passed" with exit 130, a JUnit file missing, and "no model was written" beside a
    written model, and tracebacks from the process's ending."""
    out, report, junit = tmp_path / "o.onnx", tmp_path / "r.json", tmp_path / "j.xml"
    proc = run_signalled("bnfold.cli:_write_atomic", sig, ["fuse", MODELS / "resnet_mini.onnx", "-o", out,
                                                          "--no-verify", "--report", report, "--junit", junit])
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert out.exists() and junit.exists() and json.loads(report.read_text())["after"]["bn_count"] == 0


@pytest.mark.parametrize("to", ["parent", "group", "parent then group"])
def test_parallel_batch_stopped_by_sigterm_reports_exactly_what_it_wrote(tmp_path, to):
    """-j 2, SIGTERM to the parent only (Ctrl-C ignored, as in a script's background job) or to the whole
    group (`timeout`): the running jobs are stopped, and the report's "written" models are exactly the
    files on disk (a trial saw written files reported "not started", and a worker's traceback)."""
    import signal
    import time

    script = "\n".join([
        "import sys, time",
        "from bnfold import workflow",
        "real = workflow.run_one",
        "def slow(*a, **k):",
        "    time.sleep(0.4)",
        "    return real(*a, **k)",
        "workflow.run_one = slow",
        "from bnfold.cli import main",
        "sys.argv = ['bnfold', 'fuse', sys.argv[1], '--out-dir', sys.argv[2], '-j', '2', '--no-verify',",
        "            '--report', sys.argv[3]]",
        "main()",
    ])
    src, out, report = tmp_path / "src", tmp_path / "out", tmp_path / "r.json"
    src.mkdir()
    for k in range(8):
        shutil.copy(MODELS / "mlp_bn1d.onnx", src / f"m{k}.onnx")
    proc = subprocess.Popen([sys.executable, "-c", script, str(src), str(out), str(report)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.monotonic() + 60
    while not (out.is_dir() and any(p.suffix == ".onnx" for p in out.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.02)
    if to != "group":
        proc.send_signal(signal.SIGTERM)
    if to != "parent":  # `timeout` signals bnfold, then its whole group: one request, not an insisting second
        os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr, stderr
    doc = json.loads(report.read_text())
    assert doc["exit_code"] == 143 and doc["interrupted"], doc
    written = sorted(os.path.basename(m["output"]) for m in doc["models"] if m["status"] == "written")
    assert written == sorted(p.name for p in out.iterdir()), (doc, list(out.iterdir()))  # no hidden staging
    assert 1 <= len(written) < 8, doc
    assert {m["exit_code"] for m in doc["models"] if m["status"] == "interrupted"} == {143}, doc  # said 130
    assert not any("second interrupt" in (m.get("error") or "") for m in doc["models"]), doc


def test_batch_stopped_by_sigterm_reports_the_exit_status_it_ends_with(tmp_path):
    """A batch that SIGTERM stops ends with 143: its summary line and its JSON report must say 143
    too (they said 130, the Ctrl-C status, while the process ended with 143)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.onnx", "b.onnx"):
        shutil.copy(MODELS / "resnet_mini.onnx", src / name)
    out, report = tmp_path / "out", tmp_path / "report.json"
    proc = run_signalled("bnfold.modelio.stream:write_model", "SIGTERM",  # while the second model is written
                         ["fuse", src / "a.onnx", src / "b.onnx", "--out-dir", out, "--no-verify", "--report", report],
                         on_call=2)
    assert proc.returncode == 143, proc.stderr
    assert proc.stdout.rstrip().endswith("; exit 143"), proc.stdout
    doc = json.loads(report.read_text())
    assert doc["exit_code"] == 143 and doc["interrupted"] is True, doc
    assert [m["status"] for m in doc["models"]] == ["written", "interrupted"], doc
    assert doc["models"][1]["exit_code"] == 143, doc  # each interrupted model's code too (said 130)


def test_verification_options_under_no_verify_are_named_as_doing_nothing(tmp_path):
    """No silent no-ops: --shape (with a typo) under --no-verify passed unnoticed."""
    res = run("fuse", MODELS / "resnet_mini.onnx", "-o", tmp_path / "o.onnx", "--no-verify", "--shape", "inptu=1x3",
              "--seed", "3")
    assert res.exit_code == 0, res.output
    assert "bnfold: warning: --seed, --shape: no effect with --no-verify" in res.stderr, res.stderr
    res = run("fuse", MODELS / "resnet_mini.onnx", "-o", tmp_path / "p.onnx", "--no-verify")
    assert res.exit_code == 0 and "warning" not in res.stderr, res.stderr


def test_an_interrupted_single_model_run_replaces_an_earlier_report(tmp_path):
    """A single model interrupted mid-run has no fold report: its outcome is written instead, so that the
    --report of an earlier run (a success) never stays beside a run that exited 143 (trial)."""
    report = tmp_path / "r.json"
    report.write_text('{"stale": true}')
    proc = run_signalled("bnfold.modelio.stream:write_model", "SIGTERM",
                         ["fuse", MODELS / "resnet_mini.onnx", "-o", tmp_path / "o.onnx", "--no-verify",
                          "--report", report])
    assert proc.returncode == 143, proc.stderr
    doc = json.loads(report.read_text())
    assert doc["status"] == "interrupted" and doc["exit_code"] == 143, doc
