"""Many models in one call, the CI gate (check), and output conventions for pipelines."""
from __future__ import annotations

import json
import shutil
import sys
import xml.etree.ElementTree as ET

import onnx
from click.testing import CliRunner

from bnfold import cli
from bnfold.cli import main
from conftest import MODELS, ROOT, bn_count, default_sigint


def run(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def corpus(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    shutil.copy(MODELS / "resnet_mini.onnx", src / "a.onnx")
    shutil.copy(MODELS / "mlp_bn1d.onnx", src / "sub" / "b.onnx")
    return src


def test_fuse_folder_and_files_into_out_dir_in_parallel(tmp_path):
    src = corpus(tmp_path)
    extra = tmp_path / "c.onnx"
    shutil.copy(MODELS / "vit_bn1d.onnx", extra)
    out = tmp_path / "out"
    out.mkdir()
    res = run("fuse", src, extra, "--out-dir", out, "--jobs", "2")
    assert res.exit_code == 0, res.output
    for path in (out / "a.onnx", out / "sub" / "b.onnx", out / "c.onnx"):
        assert bn_count(onnx.load(str(path))) == 0
    assert "3 model(s): 3 ok" in res.output and "ok, verified" in res.output
    assert "[3/3]" in res.output  # not a terminal: one plain line per model


def test_one_failure_does_not_stop_the_rest_and_sets_the_exit_code(tmp_path):
    src = corpus(tmp_path)
    (src / "broken.onnx").write_bytes(b"not a model")
    out = tmp_path / "out"
    out.mkdir()
    res = run("fuse", src, "--out-dir", out, "--no-verify")
    assert res.exit_code == 2
    assert (out / "a.onnx").exists() and (out / "sub" / "b.onnx").exists() and not (out / "broken.onnx").exists()
    assert "broken.onnx: is not an ONNX model" in res.output and "1 could not be processed" in res.output


def test_check_require_folded_fails_unprocessed_models_and_writes_nothing(tmp_path):
    src = corpus(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    res = run("check", src)
    assert res.exit_code == 0, res.output
    res = run("check", src, "--require-folded", "--junit", tmp_path / "j.xml", "--json")
    assert res.exit_code == 1
    data = json.loads(res.stdout)  # errors go to stderr; stdout is only the JSON
    assert [o["exit_code"] for o in data["models"]] == [1, 1]
    assert "can still be folded" in data["models"][0]["error"]
    assert ET.parse(tmp_path / "j.xml").getroot().tag == "testsuites"
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.name != "j.xml")
    assert after == before


def test_check_passes_fused_models_and_annotates_failures_on_github(tmp_path):
    src = corpus(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    assert run("fuse", src, "--out-dir", out, "-q").exit_code == 0
    res = run("check", out, "--require-folded", "-q")
    assert res.exit_code == 0 and res.output == ""
    res = run("check", src, "--require-folded", env={"GITHUB_ACTIONS": "true"})
    assert res.exit_code == 1 and f"::error file={src / 'a.onnx'}::" in res.output


def test_colours_only_on_a_terminal_without_no_color(monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert cli._color()
    monkeypatch.setenv("NO_COLOR", "1")
    assert not cli._color()
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert not cli._color()


def test_pre_commit_hooks_run_bnfold_check():
    text = (ROOT / ".pre-commit-hooks.yaml").read_text()
    assert "entry: bnfold check" in text and "files: \\.onnx(\\.data)?$" in text


def small_conv_bn(path):
    """A Conv+BN net with a symbolic batch N: quick to fold and verify even at N=128."""
    from conftest import bn_params, build, rand

    m = build("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) {
            c = Conv <pads = [1, 1, 1, 1]> (x, w)
            y = BatchNormalization (c, s, b, m, v)
        }""", w=rand(4, 3, 3, 3), **bn_params(4))
    onnx.save_model(m, str(path))
    return path


def test_ctrl_c_stops_a_parallel_batch_at_once_and_says_what_was_written(tmp_path):
    """A real SIGINT to a `fuse --jobs 2` process, sent once the first output exists: no model
    starts after it, the running ones stop (resnet_mini at batch 128 takes seconds to verify,
    the first model a fraction of one), nothing partial is left, finished lines are printed."""
    import os
    import signal
    import subprocess
    import time

    src = tmp_path / "src"
    src.mkdir()
    models = [small_conv_bn(src / "a.onnx")]
    for n in "bcd":
        shutil.copy(MODELS / "resnet_mini.onnx", src / f"{n}.onnx")
        models.append(src / f"{n}.onnx")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "bnfold", "fuse", *map(str, models), "--out-dir", str(out),
                             "--jobs", "2", "--dim", "N=128", "--report", str(tmp_path / "r.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)),  # -m puts the cwd first on sys.path
                            preexec_fn=default_sigint)
    while not (out / "a.onnx").exists() and proc.poll() is None:
        time.sleep(0.01)  # polling for the first output, not timing anything
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 130, stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.onnx"]  # no other output, no staged folder
    assert bn_count(onnx.load(str(out / "a.onnx"))) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert [m["status"] for m in data["models"]] == ["written", "interrupted", "interrupted", "interrupted"]
    assert data["models"][-1]["error"].endswith("not started (interrupted)")  # cancelled, not run
    assert f"[1/4] {models[0]}: ok" in stderr  # the finished model's line
    assert (f"interrupted: 1 output(s) written ({out / 'a.onnx'}); 3 model(s) not written "
            f"({models[1]}, {models[2]}, {models[3]})") in stderr
    assert "Traceback" not in stderr


def test_batch_lines_name_each_model_once(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.onnx").write_bytes(b"")
    good = tmp_path / "good.onnx"
    shutil.copy(MODELS / "mlp_bn1d.onnx", good)
    res = run("fuse", good, bad / "empty.onnx", "--out-dir", tmp_path / "out", "--no-verify")
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if "empty.onnx" in ln and "interrupted" not in ln]
    assert lines and all(ln.count("empty.onnx") == 1 for ln in lines), lines


def test_an_out_dir_inside_the_searched_folder_is_not_searched_again(tmp_path):
    src = corpus(tmp_path)
    out = src / "deploy"
    assert run("fuse", src, "--out-dir", out, "--no-verify", "-q").exit_code == 0
    res = run("fuse", src, "--out-dir", out, "--no-verify", "--json")  # the same command, run again
    assert res.exit_code == 0, res.output
    assert sorted(m["model"] for m in json.loads(res.stdout)["models"]) == [str(src / "a.onnx"),
                                                                           str(src / "sub" / "b.onnx")]
    assert not (out / "deploy").exists()


def test_an_out_dir_that_is_the_searched_folder_or_above_it_holds_inputs_not_earlier_outputs(tmp_path, monkeypatch):
    """`fuse models --out-dir models` would replace each model by its fold: refused like `fuse m.onnx
    --out-dir .`, not skipped as if the models were an earlier run's outputs (that exited 0 having done
    nothing); `fuse models --out-dir .` writes beside the folder."""
    src = corpus(tmp_path)
    before = {p: p.read_bytes() for p in src.rglob("*.onnx")}
    res = run("fuse", src, "--out-dir", src, "--no-verify")
    assert res.exit_code == 2 and "output path is the input model" in res.stderr, res.output
    assert {p: p.read_bytes() for p in src.rglob("*.onnx")} == before
    monkeypatch.chdir(tmp_path)
    res = run("fuse", "src", "--out-dir", ".", "--no-verify")
    assert res.exit_code == 0, res.output
    assert bn_count(onnx.load("a.onnx")) == 0 and bn_count(onnx.load("sub/b.onnx")) == 0
    assert {p: p.read_bytes() for p in src.rglob("*.onnx")} == before


def test_a_searched_folder_holding_only_earlier_outputs_is_refused(tmp_path):
    src = tmp_path / "src"
    (src / "deploy").mkdir(parents=True)
    shutil.copy(MODELS / "mlp_bn1d.onnx", src / "deploy" / "b.onnx")
    res = run("fuse", src, "--out-dir", src / "deploy", "--no-verify")
    assert res.exit_code == 2 and "inside --out-dir" in res.stderr, res.output


def test_a_folder_of_fused_outputs_only_says_so_and_how_to_include_them(tmp_path):
    shutil.copy(MODELS / "mlp_bn1d.onnx", tmp_path / "a.fused.onnx")
    res = run("check", tmp_path)
    assert res.exit_code == 2 and "only bnfold outputs (1 *.fused.onnx" in res.stderr, res.output
    assert "name them" in res.stderr and res.stderr.count("\n") == 1
    assert run("check", tmp_path / "a.fused.onnx").exit_code == 0  # named: checked


def test_report_and_junit_on_one_file_are_refused(tmp_path):
    src = corpus(tmp_path)
    for args in (("fuse", src, "--out-dir", tmp_path / "out", "--no-verify"), ("check", src)):
        res = run(*args, "--report", tmp_path / "r", "--junit", tmp_path / "r")
        assert res.exit_code == 2 and "name the same file" in res.stderr, res.output
        assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_report_inside_the_out_dir_that_fuse_creates(tmp_path):
    """--out-dir is created when missing: a report inside it was refused ("report folder does not exist")."""
    src = corpus(tmp_path)
    out = tmp_path / "deploy" / "v1"
    res = run("fuse", src, "--out-dir", out, "--no-verify", "--report", out / "report.json",
              "--junit", out / "bnfold.xml")
    assert res.exit_code == 0, res.output
    assert [m["status"] for m in json.loads((out / "report.json").read_text())["models"]] == ["written"] * 2
    assert ET.parse(out / "bnfold.xml").getroot().tag == "testsuites"
    res = run("fuse", src, "--out-dir", tmp_path / "o2", "--no-verify", "--report", tmp_path / "o2" / "none" / "r")
    assert res.exit_code == 2 and "does not exist" in res.stderr, res.output


def test_force_in_place_is_refused_before_anything_is_read(tmp_path):
    model = tmp_path / "m.onnx"
    shutil.copy(MODELS / "mlp_bn1d.onnx", model)
    before = model.read_bytes()
    res = run("fuse", model, "--in-place", "--force")
    assert res.exit_code == 2 and res.stderr.startswith("bnfold: error: --force with --in-place would replace")
    assert model.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
