"""Shared test helpers.

Models are written in ONNX text syntax; every name a node reads that the text does
not define becomes an initializer from the keyword arrays. Equivalence is judged
independently of bnfold: ONNX Runtime (optimisations off) on the unmodified model
is the reference, with tolerances that scale with the output's magnitude.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"

# Running the CLI in a subprocess must use this interpreter's bnfold.
os.environ.setdefault("PYTHONPATH", str(ROOT))


def build(text: str, **arrays: np.ndarray) -> onnx.ModelProto:
    """Parse ONNX text and attach ``arrays`` as initializers."""
    model = onnx.parser.parse_model(text)
    for name, value in arrays.items():
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return model


def bn_params(c: int, seed: int = 0, prefix: str = "", dtype=np.float32) -> Dict[str, np.ndarray]:
    """Trained-like BN parameters: variances over orders of magnitude, non-zero means."""
    rng = np.random.default_rng(seed)
    return {
        f"{prefix}s": rng.uniform(0.5, 1.5, c).astype(dtype) * np.where(rng.random(c) < 0.2, -1, 1).astype(dtype),
        f"{prefix}b": rng.normal(0, 0.5, c).astype(dtype),
        f"{prefix}m": rng.normal(0, 1.0, c).astype(dtype),
        f"{prefix}v": (10.0 ** rng.uniform(-3, 2, c)).astype(dtype),
    }


def rand(*shape, seed: int = 1, dtype=np.float32, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(0, scale, shape)).astype(dtype)


def ort_run(model, feeds: Dict[str, np.ndarray], tmp_path: Optional[Path] = None):
    """Outputs of ``model`` (proto or path) on the CPU, graph optimisations disabled."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    src = model if isinstance(model, (str, Path)) else model.SerializeToString()
    sess = ort.InferenceSession(str(src) if isinstance(src, Path) else src, so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def feeds_for(model: onnx.ModelProto, seed: int = 7, batch: int = 2) -> Dict[str, np.ndarray]:
    """Random feeds for every real graph input (symbolic dims become ``batch``)."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for v in model.graph.input:
        if v.name in inits:
            continue
        tt = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in tt.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.dtype(dtype).kind == "b":
            feeds[v.name] = rng.random(shape) < 0.5
        elif np.dtype(dtype).kind in "iu":
            feeds[v.name] = rng.integers(0, 3, shape).astype(dtype)
        else:
            feeds[v.name] = rng.normal(size=shape).astype(dtype)
    return feeds


def assert_close(ref: np.ndarray, got: np.ndarray, rtol: float = 1e-3, atol_scale: float = 1e-4) -> None:
    """Element-wise: |got - ref| <= atol_scale * max|ref| + rtol * |ref| (float64 arithmetic)."""
    assert ref.shape == got.shape and ref.dtype == got.dtype, (ref.shape, ref.dtype, got.shape, got.dtype)
    r = ref.astype(np.float64)
    g = got.astype(np.float64)
    assert np.isfinite(g).all() == np.isfinite(r).all(), "non-finite values differ"
    scale = max(np.abs(r).max(), 1e-30)
    err = np.abs(r - g)
    bound = atol_scale * scale + rtol * np.abs(r)
    worst = np.argmax(err - bound)
    assert (err <= bound).all(), f"max error {err.max():.3g} vs scale {scale:.3g} at {worst}"


def assert_equivalent(original: onnx.ModelProto, folded: onnx.ModelProto, *, rtol=1e-3, atol_scale=1e-4,
                      feeds=None) -> None:
    feeds = feeds or feeds_for(original)
    for ref, got in zip(ort_run(original, feeds), ort_run(folded, feeds)):
        assert_close(ref, got, rtol, atol_scale)


def bn_count(model: onnx.ModelProto) -> int:
    def walk(nodes):
        n = 0
        for node in nodes:
            n += node.op_type == "BatchNormalization"
            for a in node.attribute:
                if a.HasField("g"):
                    n += walk(a.g.node)
                for g in a.graphs:
                    n += walk(g.node)
        return n

    return walk(model.graph.node) + sum(walk(f.node) for f in model.functions)


def check(model: onnx.ModelProto) -> None:
    """The ONNX checker with full_check (shape inference included)."""
    onnx.checker.check_model(model, full_check=True)


@pytest.fixture
def fold():
    """``fold(model)`` -> (result, folded model), after checking the result is a valid model."""
    from bnfold import fuse

    def _fold(model, **kw):
        result = fuse(model, **kw)
        check(result.to_model())
        return result, result.to_model()

    return _fold


def folds_completely(model: onnx.ModelProto):
    """Fuse ``model``: every BN folds, the result passes the checker and matches ONNX Runtime on
    the original. Returns the FuseResult."""
    from bnfold import fuse

    check(model)
    result = fuse(model)
    check(result.to_model())
    assert bn_count(result.to_model()) == 0 and not result.kept, [r.detail for r in result.records]
    assert_equivalent(model, result.to_model())
    return result


@pytest.fixture
def fake_cuda(monkeypatch):
    """Simulate a working CUDA provider: sessions asked for CUDA run on the CPU."""
    from bnfold import runner

    monkeypatch.setattr(runner, "cuda_status", lambda: (True, ""))
    real = runner.provider_list
    monkeypatch.setattr(runner, "provider_list", lambda p: real(runner.CPU))


def default_sigint() -> None:
    """``preexec_fn`` for a subprocess a test sends SIGINT to: it reacts as under a terminal even when
    this test run started with SIGINT ignored (a background job; some CI runners)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def sigint_default():
    """Ctrl-C raises KeyboardInterrupt in this process for the test, whatever the run inherited."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)

