"""The shipped models fold completely and equivalently, and the README's commands work."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys

import onnx
import pytest

from bnfold import fuse
from conftest import MODELS, ROOT, assert_equivalent, bn_count, check

SHIPPED = sorted(p.name for p in MODELS.glob("*.onnx"))


def test_models_are_small_and_realistic():
    assert len(SHIPPED) >= 4
    assert sum((MODELS / n).stat().st_size for n in SHIPPED) < 20 * 2**20
    import numpy as np
    from onnx import numpy_helper

    for name in SHIPPED:
        model = onnx.load(str(MODELS / name))
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        for bn in (n for n in model.graph.node if n.op_type == "BatchNormalization"):
            gamma, beta, mean, var = (inits[i] for i in bn.input[1:])
            assert not np.allclose(gamma, 1) and not np.allclose(beta, 0) and not np.allclose(mean, 0), bn.name


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_folds_completely(name):
    model = onnx.load(str(MODELS / name))
    result = fuse(model)
    check(result.to_model())
    assert bn_count(result.to_model()) == 0 and not result.kept
    assert_equivalent(model, result.to_model())


def _readme_block(title: str) -> list:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {title}", 1)[1]
    block = re.search(r"```(?:sh|console|bash)\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_quick_start_has_two_commands_and_ci_runs_the_second():
    commands = _readme_block("Quick start")
    assert len(commands) == 2
    assert "bnfold fuse models/" in commands[0]
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci


def _run_bnfold(command: str, cwd) -> subprocess.CompletedProcess:
    args = shlex.split(command)
    assert args[0] == "bnfold"
    return subprocess.run([sys.executable, "-m", "bnfold", *args[1:]], cwd=cwd, capture_output=True, text=True)


def test_quick_start_fuse_command_runs(tmp_path):
    command = _readme_block("Quick start")[0].split("&&", 1)[1].strip()
    shutil.copytree(MODELS, tmp_path / "models")
    proc = _run_bnfold(command, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "EQUIVALENT" in proc.stdout


def test_usage_examples_run(tmp_path):
    """Every `bnfold ...` line of the README's Usage block runs with the exit code its comment states."""
    shutil.copytree(MODELS, tmp_path / "models")
    for line in _readme_block("Usage"):
        command, _, comment = line.partition("  # ")
        expected = int(re.search(r"exit (\d)", comment).group(1)) if "exit" in comment else 0
        proc = _run_bnfold(command.strip(), tmp_path)
        assert proc.returncode == expected, (command, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_insert_default_ops_after_fuse_reaches_every_2d_matmul():
    """A Gemm given a BN first must not hide the rank of the MatMuls after it (issue #12.6)."""
    import numpy as np

    from bnfold.insert import insert
    from conftest import feeds_for, ort_run

    folded = fuse(onnx.load(str(MODELS / "mlp_bn1d.onnx"))).to_model()
    result = insert(folded)
    assert [(r.host_op, r.inserted) for r in result.records] == [
        ("Gemm", True), ("MatMul", True), ("MatMul", True), ("Gemm", True)]
    check(result.model)
    feeds = feeds_for(folded)
    for ref, got in zip(ort_run(folded, feeds), ort_run(result.model, feeds)):
        assert np.array_equal(ref, got)  # identity BNs: bit-identical


def test_python_api_snippets_run_as_written(tmp_path):
    """The README's Python API blocks run from a checkout's root and print what their comments say;
    their outputs are checked with ONNX Runtime on the unmodified models."""
    import numpy as np

    from conftest import feeds_for, ort_run

    section = (ROOT / "README.md").read_text().split("### Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    shutil.copytree(MODELS, tmp_path / "models")
    outputs = []
    for block in blocks:
        proc = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True,
                              env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout.splitlines())
    assert outputs[0] == ["written", "0", "True", "1"]
    for ref, out in [("resnet_mini.onnx", "resnet_mini.fused.onnx"), ("vit_bn1d.onnx", "vit.fused.onnx"),
                     ("resnet_mini.onnx", "with_bn.onnx")]:  # insert --mode preserve keeps the function
        model, got = onnx.load(str(MODELS / ref)), onnx.load(str(tmp_path / out))
        feeds = feeds_for(model)
        for a, b in zip(ort_run(model, feeds), ort_run(got, feeds)):
            np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4 * float(np.abs(a).max()))
