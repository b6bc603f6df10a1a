"""The verified-write workflow: internal errors, file safety, batches, interrupts, CI reports
and the exit-code policy, through the library and through click's CliRunner."""
from __future__ import annotations

import json
import os
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx.external_data_helper import convert_model_to_external_data

import bnfold
from bnfold import __version__, fold, numerics
from bnfold.cli import main
from conftest import MODELS, ROOT, bn_count, build
from junit_schema import problems


def run(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def files_under(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "net.onnx"
    shutil.copy(MODELS / "mlp_bn1d.onnx", path)
    return path


def external(tmp_path, name="m.onnx"):
    """mlp_bn1d saved with its weights in ``<name>.data``."""
    m = onnx.load(str(MODELS / "mlp_bn1d.onnx"))
    convert_model_to_external_data(m, all_tensors_to_one_file=True, location=name + ".data", size_threshold=0)
    path = tmp_path / name
    onnx.save_model(m, str(path))
    assert (tmp_path / (name + ".data")).exists()
    return path


def no_bn_model(path):
    m = build("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 4] x) => (float[2, 4] y) { y = Relu(x) }""")
    onnx.save_model(m, str(path))
    return path


@pytest.fixture
def boom(monkeypatch):
    """A planted bug: a fold helper raises TypeError."""
    def bug(*args, **kwargs):
        raise TypeError("planted bug")

    monkeypatch.setattr(fold, "_fold_backward", bug)


# -- A: internal errors are not verdicts -----------------------------------------------------

def test_internal_error_exits_3_writes_nothing_and_asks_for_a_bug_report(model, boom):
    before = files_under(model.parent)
    res = run("fuse", model)
    assert res.exit_code == 3, res.output
    assert "internal error (TypeError: planted bug)" in res.output and f"bnfold {__version__}" in res.output
    assert "Traceback" not in res.output and "UNSUPPORTED_HOST" not in res.output
    assert files_under(model.parent) == before
    res = run("fuse", model, "-v")
    assert res.exit_code == 3 and "Traceback" in res.output and "planted bug" in res.output


def test_check_fails_on_an_internal_error_and_a_batch_goes_on(model, boom, tmp_path):
    assert run("check", model, "--require-folded").exit_code == 3
    plain = no_bn_model(tmp_path / "plain.onnx")
    out = tmp_path / "out"
    res = run("fuse", model, plain, "--out-dir", out, "--json")
    assert res.exit_code == 3
    data = json.loads(res.stdout)
    assert [m["status"] for m in data["models"]] == ["internal_error", "written"]
    assert (out / "plain.onnx").exists() and not (out / "net.onnx").exists()


def test_a_bug_while_writing_is_an_internal_error_not_an_unwritable_output(model, monkeypatch):
    from bnfold.modelio import stream

    def bug(*args, **kwargs):
        raise ValueError("planted bug in the writer")

    monkeypatch.setattr(stream, "write_model", bug)
    res = run("fuse", model, "--no-verify")
    assert res.exit_code == 3 and "could not be written" not in res.output and "planted bug" in res.output
    assert sorted(p.name for p in model.parent.iterdir()) == ["net.onnx"]  # no output, no temporary


def test_a_batch_goes_on_after_a_runtime_crash_reported_as_bnfold_error(tmp_path, monkeypatch):
    from bnfold import verification
    from bnfold.errors import BnfoldError

    class RuntimeCrashed(BnfoldError):  # as a worker process reports a native crash
        exit_code = 2

    real = verification.verify

    def crash_on_a(reference, candidate, **kw):
        if os.fspath(reference).endswith("a.onnx"):
            raise RuntimeCrashed("ONNX Runtime crashed (SIGSEGV)", reference)
        return real(reference, candidate, **kw)

    monkeypatch.setattr(verification, "verify", crash_on_a)
    for n in ("a", "b"):
        shutil.copy(MODELS / "mlp_bn1d.onnx", tmp_path / f"{n}.onnx")
    res = run("fuse", tmp_path / "a.onnx", tmp_path / "b.onnx", "--out-dir", tmp_path / "o")
    assert res.exit_code == 2 and "SIGSEGV" in res.output
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["b.onnx"]


def test_library_reports_an_internal_error_as_an_outcome(model, boom):
    outcome = bnfold.fuse_file(model, model.with_name("x.onnx"))
    assert outcome.status == "internal_error" and outcome.exit_code == 3 and not outcome.written
    assert "TypeError" in outcome.traceback and not model.with_name("x.onnx").exists()


# -- B, C: the verified write in the library; the Report's exit code --------------------------

def test_fuse_file_writes_only_a_verified_result(model, monkeypatch):
    out = model.with_name("out.onnx")
    ok = bnfold.fuse_file(model, out, verify_kwargs={"providers": "cpu"})
    assert ok.status == "written" and ok.exit_code == 0 and ok.verified and ok.output == str(out)
    assert bn_count(onnx.load(str(out))) == 0
    out.unlink()
    real = numerics.bn_affine
    monkeypatch.setattr(numerics, "bn_affine", lambda s, b, m, v, e: real(s, b, np.zeros_like(m), v, e))
    bad = bnfold.fuse_file(model, out)
    assert bad.status == "not_equivalent" and bad.exit_code == 1 and not out.exists()
    forced = bnfold.fuse_file(model, out, force=True)
    assert forced.status == "forced" and forced.exit_code == 1 and out.exists()
    report = bnfold.Report([ok, forced])
    assert report.exit_code == 1 and report.written == [str(out), str(out)]
    assert bnfold.Report([ok]).exit_code == 0


def test_report_exit_code_policy():
    from bnfold.workflow import FuseOutcome, Report, Status

    def o(status, code):
        return FuseOutcome("m.onnx", status, exit_code=code)

    assert Report([o(Status.WRITTEN, 0), o(Status.UNUSABLE, 2), o(Status.NOT_EQUIVALENT, 1)]).exit_code == 2
    assert Report([o(Status.UNUSABLE, 2), o(Status.INTERNAL_ERROR, 3)]).exit_code == 3
    assert Report([o(Status.WRITTEN, 0), o(Status.INTERRUPTED, 130)]).exit_code == 130
    assert Report().exit_code == 0


def test_kept_reasons_render_from_structured_fields(tmp_path):
    m = onnx.load(str(MODELS / "resnet_mini.onnx"))
    bn = next(n for n in m.graph.node if n.op_type == "BatchNormalization")
    bn.attribute.append(onnx.helper.make_attribute("training_mode", 1))
    path = tmp_path / "m.onnx"
    onnx.save_model(m, str(path))
    res = run("inspect", path, "--json")
    rec = next(r for r in json.loads(res.output)["records"] if not r["folded"])
    assert rec["why"] and rec["detail"].endswith(rec["why"]) and rec["node"] not in rec["why"]
    assert f"TRAINING_MODE: {rec['why']}" in run("inspect", path).output


# -- D: no output replaces a file the input reads --------------------------------------------

def test_output_over_the_inputs_external_data_is_refused(tmp_path):
    path = external(tmp_path)
    data = tmp_path / "m.onnx.data"
    before = files_under(tmp_path)
    res = run("fuse", path, "-o", data)
    assert res.exit_code == 2 and "a file the input reads" in res.output and "Traceback" not in res.output
    (tmp_path / "link.onnx").symlink_to(data)
    os.link(path, tmp_path / "hard.onnx")
    before = files_under(tmp_path)
    for target in (tmp_path / "link.onnx", tmp_path / "hard.onnx", tmp_path / "sub" / ".." / "m.onnx.data"):
        res = run("fuse", path, "-o", target, "--no-verify")
        assert res.exit_code == 2, (target, res.output)
    for opt in ("--report", "--junit"):
        res = run("fuse", path, opt, data)
        assert res.exit_code == 2, res.output
    res = run("verify", path, path, "--junit", data)
    assert res.exit_code == 2
    res = run("insert", path, "-o", data)
    assert res.exit_code == 2 and "a file the input reads" in res.output
    res = run("recalibrate", path, "--calibration", tmp_path / "none.npz", "-o", data)
    assert res.exit_code == 2 and "a file the input reads" in res.output
    assert files_under(tmp_path) == before
    assert run("fuse", path, "--no-verify").exit_code == 0  # the default output is fine


def test_check_output_is_a_library_function(tmp_path):
    from bnfold.errors import BnfoldError
    from bnfold.paths import check_model_output, model_files

    path = external(tmp_path)
    reads = model_files(path)
    assert [p.name for p in reads] == ["m.onnx", "m.onnx.data"]
    with pytest.raises(BnfoldError):
        check_model_output(tmp_path / "m.onnx.data", reads)
    check_model_output(tmp_path / "other.onnx", reads)


# -- E: batches never write two models to one file ---------------------------------------------

def test_clashing_targets_are_refused_before_anything_is_written(tmp_path):
    for d in ("a/b", "c"):
        (tmp_path / d).mkdir(parents=True)
        shutil.copy(MODELS / "mlp_bn1d.onnx", tmp_path / d / "m.onnx")
    out = tmp_path / "o"
    res = run("fuse", tmp_path / "a/b/m.onnx", tmp_path / "c/m.onnx", "--out-dir", out, "--jobs", "2")
    assert res.exit_code == 2 and "two models would be written here" in res.output
    assert not out.exists()
    res = run("fuse", tmp_path / "a/b/m.onnx", tmp_path / "a/b/../b/m.onnx", "--out-dir", out, "--no-verify")
    assert res.exit_code == 0 and (out / "m.onnx").exists()  # the same file named twice runs once
    assert "1 model(s)" in res.output or "BatchNormalization" in res.output


def test_a_target_that_is_another_input_is_refused(tmp_path):
    a = tmp_path / "a.onnx"
    shutil.copy(MODELS / "mlp_bn1d.onnx", a)
    shutil.copy(MODELS / "mlp_bn1d.onnx", tmp_path / "a.fused.onnx")
    before = files_under(tmp_path)
    res = run("fuse", a, tmp_path / "a.fused.onnx", "--no-verify")
    assert res.exit_code == 2 and "another input of this run" in res.output
    assert files_under(tmp_path) == before


def test_missing_out_dir_is_created(model, tmp_path):
    res = run("fuse", model, "--out-dir", tmp_path / "new" / "deeper", "--no-verify")
    assert res.exit_code == 0 and (tmp_path / "new" / "deeper" / "net.onnx").exists()


@pytest.mark.parametrize("how", ["unusable", "interrupted"])
def test_an_out_dir_made_for_outputs_never_written_does_not_stay(model, tmp_path, monkeypatch, how):
    from bnfold import workflow

    if how == "unusable":
        model.write_bytes(b"not onnx")
    else:
        def ctrl_c(*a, **k):
            raise KeyboardInterrupt
        monkeypatch.setattr(workflow, "run_one", ctrl_c)
    existing = tmp_path / "kept"
    existing.mkdir()
    res = run("fuse", model, "--out-dir", existing / "new" / "deeper", "--no-verify")
    assert res.exit_code == (2 if how == "unusable" else 130), res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "net.onnx"]
    assert list(existing.iterdir()) == []  # the folders bnfold made are gone; the one that was there stays


# -- F: overridable parameters under --require-folded ------------------------------------------

def test_require_folded_fails_bns_kept_only_as_overridable(tmp_path):
    m = onnx.load(str(MODELS / "mlp_bn1d.onnx"))
    graph_inputs = {i.name for i in m.graph.input}
    for t in m.graph.initializer:  # keep_initializers_as_inputs=True, as old exporters did
        if t.name not in graph_inputs:
            m.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    path = tmp_path / "exported.onnx"
    onnx.save_model(m, str(path))
    res = run("check", path)
    assert res.exit_code == 0
    res = run("check", path, "--require-folded")
    assert res.exit_code == 1 and "OVERRIDABLE_PARAMETER" in res.output and "--allow-overridable" in res.output


# -- G: Ctrl-C says what was written ------------------------------------------------------------

def test_interrupt_says_what_was_written_and_leaves_no_temporaries(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    for n in ("a", "b", "c"):
        shutil.copy(MODELS / "mlp_bn1d.onnx", src / f"{n}.onnx")
    real = fold._fuse  # what fuse and fuse_to_write both call

    def interrupted(path, **kw):
        if os.fspath(path).endswith("b.onnx"):
            raise KeyboardInterrupt
        return real(path, **kw)

    monkeypatch.setattr(fold, "_fuse", interrupted)
    out = tmp_path / "out"
    res = run("fuse", src, "--out-dir", out, "--no-verify", "--report", tmp_path / "r.json")
    assert res.exit_code == 130
    assert "1 output(s) written" in res.output and str(out / "a.onnx") in res.output
    assert "2 model(s) not written" in res.output and str(src / "c.onnx") in res.output
    assert "nothing was written" not in res.output
    assert sorted(p.name for p in out.iterdir()) == ["a.onnx"]  # no partial output, no temporary
    data = json.loads((tmp_path / "r.json").read_text())
    assert [m["status"] for m in data["models"]] == ["written", "interrupted", "interrupted"]
    assert data["interrupted"] is True and data["exit_code"] == 130


def test_ctrl_c_while_an_output_is_renamed_into_place_is_held_until_it_is_complete(tmp_path, monkeypatch,
                                                                                  sigint_default):
    import signal

    from bnfold import modelio

    src = tmp_path / "src"
    src.mkdir()
    for n in ("a", "b"):
        shutil.copy(MODELS / "mlp_bn1d.onnx", src / f"{n}.onnx")
    real = modelio.StagedModel.commit

    def interrupted_commit(self):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C between staging and the renames
        real(self)

    monkeypatch.setattr(modelio.StagedModel, "commit", interrupted_commit)
    out = tmp_path / "out"
    res = run("fuse", src, "--out-dir", out, "--no-verify", "--json")
    assert res.exit_code == 130
    data = json.loads(res.stdout)
    assert [m["status"] for m in data["models"]] == ["written", "interrupted"]
    assert sorted(p.name for p in out.iterdir()) == ["a.onnx"]
    assert bn_count(onnx.load(str(out / "a.onnx"))) == 0  # complete, not half written


# -- H: folder search --------------------------------------------------------------------------

def test_folder_search_skips_environments_and_honours_exclude(tmp_path):
    root = tmp_path / "repo"
    for d in ("models", ".git/x", "venv/lib", "lib/site-packages/p", "web/node_modules/m", "legacy"):
        (root / d).mkdir(parents=True)
        shutil.copy(MODELS / "mlp_bn1d.onnx", root / d / "m.onnx")
    (root / "venv" / "pyvenv.cfg").write_text("home = /usr\n")
    res = run("check", root, "--json")
    assert res.exit_code == 0, res.output
    found = sorted(os.path.relpath(m["model"], root) for m in json.loads(res.stdout)["models"])
    assert found == ["legacy/m.onnx", "models/m.onnx"]
    res = run("check", root, "--json", "--exclude", "legacy")
    assert [os.path.relpath(m["model"], root) for m in json.loads(res.stdout)["models"]] == ["models/m.onnx"]
    res = run("fuse", root, "--exclude", "legacy", "--exclude", "models/*", "--no-verify")
    assert res.exit_code == 2 and "no *.onnx" in res.output


# -- I: JUnit for every model and every exit path -----------------------------------------------

def test_junit_has_a_case_per_model_and_validates(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(MODELS / "mlp_bn1d.onnx", src / "unfolded.onnx")
    (src / "truncated.onnx").write_bytes((MODELS / "resnet_mini.onnx").read_bytes()[:5000])
    no_bn_model(src / "plain.onnx")
    xml = tmp_path / "r.xml"
    res = run("check", src, "--require-folded", "--junit", xml)
    assert res.exit_code == 2
    text = xml.read_text()
    assert problems(text) == []
    suite = ET.fromstring(text).find("testsuite")
    cases = {(c.get("classname"), c.get("name")): c for c in suite.iter("testcase")}
    assert {cls for cls, _ in cases} == {str(src / n) for n in ("plain.onnx", "truncated.onnx", "unfolded.onnx")}
    assert cases[(str(src / "unfolded.onnx"), "check")].find("failure") is not None
    assert cases[(str(src / "truncated.onnx"), "check")].find("error") is not None
    assert cases[(str(src / "plain.onnx"), "check")].find("failure") is None
    assert (str(src / "unfolded.onnx"), "cpu:scores") in cases  # its verification, per output
    assert suite.get("failures") == "1" and suite.get("errors") == "1"
    assert suite.get("tests") == str(len(cases)) and suite.get("time") is not None


def test_junit_from_verify_on_exit_2_and_from_fuse(model, tmp_path):
    xml = tmp_path / "v.xml"
    res = run("verify", model, tmp_path / "missing.onnx", "--junit", xml)
    assert res.exit_code == 2 and problems(xml.read_text()) == []
    case = ET.parse(xml).getroot().find("testsuite/testcase")
    assert case.find("error") is not None and case.get("classname") == str(tmp_path / "missing.onnx")
    res = run("fuse", model, "--junit", xml)
    assert res.exit_code == 0 and problems(xml.read_text()) == []
    names = {c.get("name") for c in ET.parse(xml).getroot().iter("testcase")}
    assert "fuse" in names and "cpu:scores" in names


def test_junit_is_written_when_the_run_is_refused_before_it_starts(model, tmp_path):
    xml = tmp_path / "r.xml"
    res = run("check", tmp_path / "nowhere", "--junit", xml)
    assert res.exit_code == 2 and problems(xml.read_text()) == []
    error = ET.parse(xml).getroot().find("testsuite/testcase/error")
    assert error is not None and "no such file" in error.get("message")
    res = run("fuse", model, "--out-dir", tmp_path / "o", "-o", tmp_path / "x.onnx", "--junit", xml)  # usage
    assert res.exit_code == 2 and ET.parse(xml).getroot().find("testsuite/testcase/error") is not None
    res = run("fuse", model, "--junit", model)  # the JUnit path itself refused: not written
    assert res.exit_code == 2 and model.read_bytes() == (MODELS / "mlp_bn1d.onnx").read_bytes()


def test_junit_checker_rejects_what_the_schema_rejects():
    assert problems('<testsuites><testsuite name="a" tests="1" failures="0" errors="0">'
                    '<testcase name="x" classname="m.onnx" time="0.100"/></testsuite></testsuites>') == []
    assert problems('<testsuites><testsuite name="a" tests="1" failures="0">'
                    '<testcase classname="m"/></testsuite></testsuites>')  # errors, name missing
    assert problems('<testsuites skipped="1"/>')  # not an attribute of the root
    assert problems('<testsuites><testsuite name="a" tests="1" failures="0" errors="0" time="1s"/></testsuites>')
    assert problems('<testsuites><testcase name="x"/></testsuites>')


# -- J: GitHub step summary ----------------------------------------------------------------------

def test_github_step_summary_table(model, tmp_path):
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    res = run("check", model, "--require-folded", env={"GITHUB_STEP_SUMMARY": str(summary), "GITHUB_ACTIONS": "true"})
    assert res.exit_code == 1 and f"::error file={model}::" in res.output
    text = summary.read_text()
    assert text.startswith("earlier step\n") and "| model | BN before -> after | verdict | margin |" in text
    assert f"| {model} | 3 -> 0 | policy_failed: 3 BatchNormalization can still be folded" in text


# -- L: pre-commit -------------------------------------------------------------------------------

def test_a_data_file_is_checked_through_its_model(tmp_path):
    path = external(tmp_path)
    res = run("check", tmp_path / "m.onnx.data", "--json")
    assert res.exit_code == 0, res.output
    assert [m["model"] for m in json.loads(res.stdout)["models"]] == [str(path)]
    res = run("check", tmp_path / "m.onnx.data", path, "--json")  # both changed: checked once
    assert len(json.loads(res.stdout)["models"]) == 1
    import re
    pattern = re.search(r"^\s+files: (.*)$", (ROOT / ".pre-commit-hooks.yaml").read_text(), re.M).group(1)
    assert re.search(pattern, "m.onnx.data") and re.search(pattern, "m.onnx")


# -- M: -q with -v ---------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [("fuse", "M"), ("check", "M"), ("inspect", "M"), ("verify", "M", "M"),
                                  ("insert", "M"), ("recalibrate", "M", "--calibration", "M")])
def test_quiet_with_verbose_is_a_usage_error(model, args):
    res = run(*[model if a == "M" else a for a in args], "-q", "-v")
    assert res.exit_code == 2 and "-q or -v" in res.output
    assert sorted(p.name for p in model.parent.iterdir()) == ["net.onnx"]


def test_readme_lists_every_exit_code():
    text = (ROOT / "README.md").read_text()
    for code in ("0", "1", "2", "3", "130", "143"):
        assert f"\n| {code} |" in text


# -- N: --require-folded on run-time weights, and the reasons it names ---------------------------

def runtime_weight_model(path):
    """A Conv whose weight is a graph input (as an export that lifts parameters to inputs
    writes it): its BN is kept as HOST_WEIGHT_NOT_CONSTANT. A second BN after a Relu stays for
    good (nothing linear to fold into)."""
    from conftest import bn_params

    m = build("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3, 8, 8] x, float[4, 3, 3, 3] w) => (float[2, 4, 8, 8] y) {
            c = Conv <pads = [1, 1, 1, 1]> (x, w)
            n = BatchNormalization (c, s, b, m, v)
            r = Relu (n)
            y = BatchNormalization (r, s2, b2, m2, v2)
        }""", **bn_params(4), **{f"{k}2": v for k, v in bn_params(4, seed=1).items()})
    onnx.save_model(m, str(path))
    return path


def test_require_folded_fails_weights_computed_at_run_time_and_lists_reason_codes(tmp_path):
    path = runtime_weight_model(tmp_path / "dynamo.onnx")
    folded = tmp_path / "folded.onnx"
    shutil.copy(MODELS / "mlp_bn1d.onnx", tmp_path / "plain.onnx")
    assert run("fuse", tmp_path / "plain.onnx", "-o", folded, "-q").exit_code == 0
    res = run("check", path, folded)
    assert res.exit_code == 0, res.output  # without the policy: the folds verify
    assert "kept: HOST_WEIGHT_NOT_CONSTANT x1, NO_HOST x1" in res.output  # a pass shows what stays, and why
    res = run("check", path, folded, "--require-folded", "--json")
    assert res.exit_code == 1, res.output
    by_model = {m["model"]: m for m in json.loads(res.stdout)["models"]}
    bad, good = by_model[str(path)], by_model[str(folded)]
    assert good["status"] == "passed"
    assert bad["status"] == "policy_failed"
    assert bad["error"] == (f"{path}: 1 kept only because of how it was exported (HOST_WEIGHT_NOT_CONSTANT x1); "
                            "1 kept that cannot be folded (NO_HOST x1)")
    assert "do_constant_folding=True" in bad["hint"]


def test_require_folded_policy_is_explained_in_check_help():
    from bnfold.reasons import Reason
    from bnfold.workflow import EXPORT_REASONS

    assert set(EXPORT_REASONS) <= {r.value for r in Reason}
    text = " ".join(run("check", "--help").output.split())
    for code in EXPORT_REASONS:
        assert code in text
    assert "BNs kept for other reasons cannot be folded exactly and pass" in text
    assert "lists each model's kept BNs by reason code" in text


# -- the input changing while bnfold works on it -----------------------------------------------

def change_file(how, path, new_bytes):
    """A new version of ``path`` lands: ``replaced`` (a new file renamed over it), ``rewritten`` (the same
    file written again, a later modification time), or ``removed``."""
    if how == "replaced":
        path.with_name("new.tmp").write_bytes(new_bytes)
        os.replace(path.with_name("new.tmp"), path)
    elif how == "rewritten":
        with open(path, "r+b") as f:
            f.write(new_bytes)
            f.truncate()
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    else:
        path.unlink()


def refused_as_changed(tmp_path, model, mode, changed):
    """Run fuse ``mode`` (OUT: tmp_path/out.onnx) or check on ``model``: exit 2 naming ``changed``, the
    changed-input error (not 'not equivalent'), 'nothing was written' for fuse (check never writes)."""
    args = ["check", model] if mode == ["CHECK"] else ["fuse", model] + [tmp_path / "out.onnx" if a == "OUT" else a
                                                                        for a in mode]
    res = run(*args)
    assert res.exit_code == 2 and "changed while bnfold read it" in res.output and str(changed) in res.output, \
        res.output
    assert "not equivalent" not in res.output
    assert ("nothing was written" in res.output) == (mode != ["CHECK"])


@pytest.mark.parametrize("how", ["replaced", "rewritten", "removed"])
@pytest.mark.parametrize("mode", [["--in-place"], ["-o", "OUT"], ["CHECK"]])
def test_a_model_changed_during_verification_is_refused_and_never_overwritten(tmp_path, monkeypatch, how, mode):
    """A new export landing while its previous version is folded: the fold and its verdict are
    of the old file, so nothing is written (--in-place would have replaced the new model with
    the old one's fold) and the error says what happened, not 'not equivalent'."""
    from bnfold import workflow

    path = tmp_path / "m.onnx"
    shutil.copy(MODELS / "resnet_mini.onnx", path)
    newer = onnx.load(str(path))
    newer.doc_string = "the newer export"
    verify_staged = workflow._verify_staged

    def change_then_verify(*args, **kwargs):
        change_file(how, path, newer.SerializeToString())
        return verify_staged(*args, **kwargs)

    monkeypatch.setattr(workflow, "_verify_staged", change_then_verify)
    refused_as_changed(tmp_path, path, mode, path)
    assert not (tmp_path / "out.onnx").exists()
    if how != "removed":
        assert onnx.load(str(path)).doc_string == "the newer export"  # the new model stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if how == "removed" else ["m.onnx"])


@pytest.mark.parametrize("how", ["replaced", "rewritten", "removed"])
@pytest.mark.parametrize("mode", [["--in-place"], ["-o", "OUT"], ["CHECK"]])
def test_external_data_changed_during_verification_is_refused_and_never_overwritten(tmp_path, monkeypatch, how,
                                                                                     mode):
    """The same for the model's external data file (a user trial replaced it mid-run: the fold of
    the old weights was written, exit 0, and --in-place pointed the model at it): the error names
    the data file, nothing is written, the new data stays."""
    from bnfold import workflow

    path, data = tmp_path / "m.onnx", tmp_path / "m.data"
    onnx.save_model(onnx.load(str(MODELS / "resnet_mini.onnx")), str(path), save_as_external_data=True,
                    location="m.data", size_threshold=1024)
    new_bytes = (np.frombuffer(data.read_bytes(), np.float32) * np.float32(1.5)).tobytes()
    verify_staged = workflow._verify_staged

    def change_then_verify(*args, **kwargs):
        change_file(how, data, new_bytes)
        return verify_staged(*args, **kwargs)

    monkeypatch.setattr(workflow, "_verify_staged", change_then_verify)
    refused_as_changed(tmp_path, path, mode, data)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["m.onnx"] if how == "removed" else ["m.data", "m.onnx"])
    if how != "removed":
        assert data.read_bytes() == new_bytes  # the new data stays
    assert "m.data" in {e.value for t in onnx.load(str(path), load_external_data=False).graph.initializer
                        for e in t.external_data}  # and the model still reads it


@pytest.mark.parametrize("mode", [["-o", "OUT"], ["--in-place"], ["CHECK"]])
def test_external_data_removed_before_the_write_is_named_as_changed(tmp_path, monkeypatch, mode):
    """Removed between load and write, the data file made the write fail: the error named the output
    ("could not be written (No such file or directory)") or check's private folder; it names the data file."""
    from bnfold import fold

    path, data = tmp_path / "m.onnx", tmp_path / "m.data"
    onnx.save_model(onnx.load(str(MODELS / "resnet_mini.onnx")), str(path), save_as_external_data=True,
                    location="m.data", size_threshold=1024)
    real_stage = fold.FuseResult.stage

    def remove_then_stage(self, *args, **kwargs):
        data.unlink(missing_ok=True)
        return real_stage(self, *args, **kwargs)

    monkeypatch.setattr(fold.FuseResult, "stage", remove_then_stage)
    refused_as_changed(tmp_path, path, mode, data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_an_unusable_verification_option_is_worded_for_the_command(tmp_path):
    """fuse says nothing was written and how to skip verification; check writes nothing and has no
    --no-verify, so it does not offer it (a trial found it did)."""
    path = tmp_path / "m.onnx"
    shutil.copy(MODELS / "resnet_mini.onnx", path)
    res = run("check", path, "--dim", "NOPE=1")
    assert res.exit_code == 2 and "NOPE" in res.output and "--no-verify" not in res.output, res.output
    res = run("fuse", path, "-o", tmp_path / "out.onnx", "--dim", "NOPE=1")
    assert res.exit_code == 2 and "nothing written (--no-verify skips verification)" in res.output, res.output
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("option", [["--shape", "nope=2x4"], ["--shape", "x=2x4x1"], ["--dim", "N=3"],
                                    ["--output-tol", "z=0:1"], ["--inputs", "missing.npz"]])
def test_verification_options_are_checked_when_nothing_was_folded(tmp_path, option):
    """A model with no BN to fold has nothing to verify, so the options naming its inputs and outputs were
    never looked at: a --shape for an input it lacks passed silently (exit 0). They are checked against
    the model all the same (shape [2, 4] with no named dimension, output y)."""
    path = no_bn_model(tmp_path / "m.onnx")
    res = run("fuse", path, "-o", tmp_path / "out.onnx", *option)
    assert res.exit_code == 2 and "nothing written (--no-verify skips verification)" in res.stderr, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no output, no staging folder
    res = run("fuse", path, "--out-dir", tmp_path / "new", *option)
    assert res.exit_code == 2 and not (tmp_path / "new").exists(), res.output  # the folder it made goes too
    res = run("check", path, *option)
    assert res.exit_code == 2 and option[1].split("=")[0] in res.stderr, res.output
    assert run("fuse", path, "-o", tmp_path / "out.onnx", *option, "--no-verify").exit_code == 0


def test_verification_options_that_fit_pass_when_nothing_was_folded(tmp_path):
    path = no_bn_model(tmp_path / "m.onnx")
    np.savez(tmp_path / "in.npz", x=np.ones((2, 4), np.float32))
    for option in (["--shape", "x=2x4"], ["--shape", "x=2,4"], ["--output-tol", "y=0:1"],
                   ["--inputs", tmp_path / "in.npz"]):
        res = run("fuse", path, "-o", tmp_path / "out.onnx", *option)
        assert res.exit_code == 0, (option, res.output)


@pytest.mark.parametrize("option", [["--shape", "input=100000000x3x32x32"], ["--dim", "N=99999999999999999999"]])
def test_random_inputs_too_large_to_make_are_refused_not_a_bug(tmp_path, option):
    """A typo asking for terabytes of random input was numpy's MemoryError or ValueError: exit 3, "a bug"."""
    res = run("check", MODELS / "resnet_mini.onnx", *option)
    assert res.exit_code == 2 and "GiB of random data" in res.stderr and "internal error" not in res.output, \
        res.output


@pytest.mark.parametrize("report_option", ["--report", "--junit"])
def test_a_report_that_cannot_be_written_does_not_deny_the_outputs_that_were(model, tmp_path, monkeypatch,
                                                                             report_option):
    """A full disk under the report: exit 2 naming it, and the message must not say "nothing was changed"
    while the model was written (new-user trial, on a full tmpfs)."""
    import errno

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)  # only report files are synced
    res = run("fuse", model, "-o", tmp_path / "out.onnx", report_option, tmp_path / "r.txt", "-q")
    assert res.exit_code == 2, res.output
    assert "r.txt: could not be written (No space left on device)" in res.stderr, res.stderr
    assert "nothing was changed" not in res.stderr and "1 output(s) written" in res.stderr, res.stderr
    assert (tmp_path / "out.onnx").exists() and not (tmp_path / "r.txt").exists()


def test_junit_is_written_when_the_run_is_interrupted_before_any_model_ran(model, tmp_path, monkeypatch):
    """The README promises the JUnit file in every exit path: Ctrl-C (or SIGTERM) while the models are
    being found left none (new-user trial, at 0.2-0.3 s)."""
    import bnfold.cli as cli

    def stopped(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_collect", stopped)
    junit = tmp_path / "j.xml"
    res = run("fuse", model, "--junit", junit)
    assert res.exit_code == 130, res.output
    root = ET.parse(junit).getroot()
    assert problems(junit.read_text()) == []
    assert "interrupted before any model ran" in ET.tostring(root, encoding="unicode")


def test_an_interrupted_verify_is_a_skipped_junit_case_as_in_fuse_and_check(model, tmp_path, monkeypatch):
    import bnfold.verification

    def stopped(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(bnfold.verification, "verify", stopped)
    junit = tmp_path / "j.xml"
    res = run("verify", model, model, "--junit", junit)
    assert res.exit_code == 130, res.output
    text = junit.read_text()
    assert problems(text) == [] and "<skipped" in text and "<error" not in text, text
