"""verify: correct folds pass, planted bugs fail, reports keep their documented shape.

The planted bugs are what a wrong fold produces: a perturbed weight, a wrong
epsilon, a dropped mean, BN parameters applied to the wrong channels, swapped
outputs, a NaN, a changed shape.
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bnfold import BnfoldError, fuse, runner
from bnfold.verification import CROSS_PROVIDER_FACTOR, Tolerance, parse_providers, verify
from conftest import MODELS, build, rand

SHIPPED = sorted(p.name for p in MODELS.glob("*.onnx"))


@pytest.fixture
def pair(tmp_path):
    """(reference path, writer) where writer(model, name) saves a candidate next to it."""
    def save(model, name):
        path = tmp_path / name
        path.write_bytes(model.SerializeToString())
        return path

    return save


@pytest.mark.parametrize("name", SHIPPED)
def test_correct_fold_of_each_shipped_model_passes(name, pair):
    ref = MODELS / name
    cand = pair(fuse(ref).to_model(), "fused.onnx")
    report = verify(ref, cand, providers="cpu", samples=3)
    assert report.equivalent, [(o.name, o.max_abs_error, o.atol) for c in report.comparisons for o in c.outputs]
    out = report.comparisons[0].outputs[0]
    assert 0 < out.max_abs_error < out.atol or out.max_abs_error == 0
    assert out.cosine_similarity > 0.999999


def _initializer(model, name):
    return next(t for t in model.graph.initializer if t.name == name)


def _edit(model, name, fn):
    t = _initializer(model, name)
    t.CopyFrom(numpy_helper.from_array(fn(numpy_helper.to_array(t).copy()), name))
    return model


def _first_bn(model):
    return next(n for n in model.graph.node if n.op_type == "BatchNormalization")


def perturbed_weight(m):
    w = fuse(m).to_model()
    conv = next(n for n in w.graph.node if n.op_type == "Conv")

    def bump(a):
        a[0] *= 1.01
        return a
    return _edit(w, conv.input[1], bump)


def wrong_epsilon(m):
    for a in _first_bn(m).attribute:
        if a.name == "epsilon":
            a.f = 1e-3
    return m


def dropped_mean(m):
    return _edit(m, _first_bn(m).input[3], np.zeros_like)


def wrong_channels(m):
    bn = _first_bn(m)
    for name in bn.input[1:]:
        _edit(m, name, lambda a: a[::-1].copy())
    return m


def nan_bias(m):
    w = fuse(m).to_model()
    conv = next(n for n in w.graph.node if n.op_type == "Conv")

    def poison(a):
        a[0] = np.nan
        return a
    return _edit(w, conv.input[2], poison)


@pytest.mark.parametrize("bug", [perturbed_weight, wrong_epsilon, dropped_mean, wrong_channels, nan_bias])
@pytest.mark.parametrize("name", ["resnet_mini.onnx", "mobilenet_mini.onnx"])
def test_planted_bug_fails(bug, name, pair):
    ref = MODELS / name
    cand = pair(bug(onnx.load(str(ref))), "bug.onnx")
    report = verify(ref, cand, providers="cpu")
    assert not report.equivalent
    out = report.comparisons[0].outputs[0]
    assert out.fail_fraction > 0 and out.worst is not None


TWO_OUT = """<ir_version: 8, opset_import: ["" : 15]>
g (float[N,4] x) => (float[N,4] a, float[N,4] b) {
    a = Relu (x)
    b = Sigmoid (x)
}"""


def test_swapped_outputs_fail(pair):
    ref = pair(build(TWO_OUT), "ref.onnx")
    swapped = build(TWO_OUT.replace("a = Relu", "tmp = Relu")
                    .replace("b = Sigmoid (x)", "a = Sigmoid (x)\n b = Identity (tmp)"))
    report = verify(ref, pair(swapped, "cand.onnx"), providers="cpu")
    assert not report.equivalent
    assert [o.equivalent for o in report.comparisons[0].outputs] == [False, False]


def test_shape_change_fails(pair):
    ref = pair(build(TWO_OUT), "ref.onnx")
    cand = build(TWO_OUT.replace("float[N,4] b)", "float[N,4,1] b)").replace(
        "b = Sigmoid (x)", "s = Sigmoid (x)\n b = Unsqueeze (s, ax)"), ax=np.array([2], np.int64))
    report = verify(ref, pair(cand, "cand.onnx"), providers="cpu")
    b = report.comparisons[0].outputs[1]
    assert not report.equivalent and not b.equivalent and "float32[2, 4]" in b.problem


def test_missing_output_fails(pair):
    ref = pair(build(TWO_OUT), "ref.onnx")
    cand = build(TWO_OUT.replace(", float[N,4] b)", ")").replace("b = Sigmoid (x)", ""))
    report = verify(ref, pair(cand, "cand.onnx"), providers="cpu")
    assert not report.equivalent and "missing" in report.comparisons[0].outputs[1].problem


def test_nan_positions_must_match_and_equal_nans_pass(pair):
    text = """<ir_version: 8, opset_import: ["" : 15]>
    g (float[N,4] x) => (float[N,4] y) { y = Sqrt (x) }"""
    ref = pair(build(text), "ref.onnx")
    assert verify(ref, pair(build(text), "same.onnx"), providers="cpu").equivalent  # NaN meets NaN
    other = build(text.replace("y = Sqrt (x)", "a = Abs (x)\n y = Sqrt (a)"))
    assert not verify(ref, pair(other, "other.onnx"), providers="cpu").equivalent


def test_error_must_exceed_both_tolerances(pair):
    text = """<ir_version: 8, opset_import: ["" : 15]>
    g (float[N,4] x) => (float[N,4] y) { y = Add (x, d) }"""
    ref = pair(build(text, d=np.zeros(4, np.float32)), "ref.onnx")
    cand = pair(build(text, d=np.full(4, 0.01, np.float32)), "cand.onnx")
    assert not verify(ref, cand, providers="cpu", rtol=0.0, atol=0.001).equivalent
    assert verify(ref, cand, providers="cpu", rtol=0.0, atol=0.02).equivalent
    assert verify(ref, cand, providers="cpu", output_tolerances={"y": Tolerance(None, 0.02)}, atol=0.0,
                  rtol=0.0).equivalent


@pytest.mark.parametrize("kw", [dict(rtol=float("nan"), atol=float("nan")), dict(atol=float("inf")),
                                dict(rtol=-1.0), dict(output_tolerances={"y": (float("nan"), 0.0)}),
                                dict(output_tolerances={"y": Tolerance(None, float("nan"))})])
def test_a_tolerance_that_is_not_a_finite_number_at_least_zero_is_refused(pair, kw):
    """NaN compares false with every difference: verify(rtol=nan, atol=nan) called two different models
    equivalent (the CLI refused such values; the library did not)."""
    text = """<ir_version: 8, opset_import: ["" : 15]>
    g (float[N,4] x) => (float[N,4] y) { y = Add (x, d) }"""
    ref = pair(build(text, d=np.zeros(4, np.float32)), "ref.onnx")
    cand = pair(build(text, d=np.full(4, 1.0, np.float32)), "cand.onnx")
    with pytest.raises(BnfoldError, match="finite number >= 0"):
        verify(ref, cand, providers="cpu", **kw)


def test_dynamic_dims_and_shapes(pair):
    text = """<ir_version: 8, opset_import: ["" : 15]>
    g (float[batch,4,seq] x) => (float[batch,4,seq] y) { y = Relu (x) }"""
    ref = pair(build(text), "ref.onnx")
    report = verify(ref, ref, providers="cpu")
    assert report.inputs["x"]["shape"] == [2, 4, 32]
    assert any("axis 2 (seq) = 32" in n for n in report.notes)
    report = verify(ref, ref, providers="cpu", dims={"batch": 3, "seq": 5})
    assert report.inputs["x"]["shape"] == [3, 4, 5] and not report.notes
    report = verify(ref, ref, providers="cpu", shapes={"x": (1, 4, 7)})
    assert report.inputs["x"]["shape"] == [1, 4, 7]


def test_npz_and_npy_inputs(pair, tmp_path):
    ref = MODELS / "mlp_bn1d.onnx"
    cand = pair(fuse(ref).to_model(), "fused.onnx")
    x = np.random.default_rng(3).normal(size=(5, 64)).astype(np.float32)
    np.savez(tmp_path / "in.npz", input=x)
    np.save(tmp_path / "in.npy", x)
    for f in ("in.npz", "in.npy"):
        report = verify(ref, cand, providers="cpu", inputs=tmp_path / f)
        assert report.equivalent and report.inputs["input"]["shape"] == [5, 64]
    np.savez(tmp_path / "bad.npz", other=x)
    with pytest.raises(BnfoldError, match="no array for input"):
        verify(ref, cand, providers="cpu", inputs=tmp_path / "bad.npz")


def test_integer_and_bool_inputs_are_generated(pair):
    text = """<ir_version: 8, opset_import: ["" : 15]>
    g (int64[N,3] i, bool[N,3] k, float16[N,3] h) => (float[N,3] y) {
        e = Gather (table, i)
        f = Cast <to = 1> (k)
        g = Cast <to = 1> (h)
        s = Add (e, f)
        y = Add (s, g)
    }"""
    ref = pair(build(text, table=rand(10)), "ref.onnx")
    report = verify(ref, ref, providers="cpu")
    assert report.equivalent
    assert report.inputs["i"]["dtype"] == "int64" and report.inputs["h"]["dtype"] == "float16"


def test_float64_conv_falls_back_to_reference_evaluator(pair):
    text = """<ir_version: 8, opset_import: ["" : 15]>
    g (double[N,2,5,5] x) => (double[N,3,3,3] y) { y = Conv (x, W) }"""
    ref = pair(build(text, W=rand(3, 2, 3, 3, dtype=np.float64)), "ref.onnx")
    report = verify(ref, ref, providers="cpu")
    assert report.equivalent and any("onnx.reference" in n for n in report.notes)


def test_json_shape(pair):
    ref = MODELS / "mlp_bn1d.onnx"
    report = verify(ref, pair(dropped_mean(onnx.load(str(ref))), "bug.onnx"), providers="cpu")
    data = json.loads(json.dumps(report.to_dict()))
    assert set(data) == {"reference", "candidate", "equivalent", "samples", "seed", "inputs", "notes",
                         "comparisons", "skipped", "localized", "timing", "method", "exact", "runtime"}
    comp = data["comparisons"][0]
    assert set(comp) == {"name", "reference_provider", "candidate_provider", "equivalent", "outputs", "placement"}
    out = comp["outputs"][0]
    assert set(out) == {"name", "equivalent", "dtype", "shape", "rtol", "atol", "max_abs_error", "max_rel_error",
                        "mean_abs_error", "cosine_similarity", "fail_fraction", "worst", "problem", "compared",
                        "method", "scale", "floor", "limit", "used"}
    assert data["method"] == "calibrated" and data["exact"]["ran"] and not data["exact"]["equivalent"]
    assert data["runtime"] is None
    assert set(data["exact"]["outputs"][0]) == {"name", "equivalent", "scale", "allowance", "deviation", "limit",
                                                "used", "reference_allowance", "candidate_allowance", "output_floor",
                                                "reference_noise", "candidate_noise", "direction", "problem"}
    assert set(data["timing"]) == {"total_s", "inference_s", "float64_s", "runtime_calibration_s", "calibration_s"}
    assert set(out["worst"]) == {"sample", "index", "reference", "candidate"}
    assert data["equivalent"] is False and comp["reference_provider"] == "CPUExecutionProvider"


def test_junit_shape(pair):
    ref = MODELS / "mlp_bn1d.onnx"
    report = verify(ref, pair(dropped_mean(onnx.load(str(ref))), "bug.onnx"), providers="cpu")
    root = ET.fromstring(report.to_junit())
    suite = root.find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "2"
    f64, cpu = suite.findall("testcase")
    assert f64.get("name") == "float64:scores" and "uses" in f64.find("failure").get("message")
    assert cpu.get("name") == "cpu:scores" and "calibrated verdict" in cpu.find("failure").get("message")


def test_localize_names_the_first_divergent_tensor(pair):
    ref = MODELS / "resnet_mini.onnx"
    model = onnx.load(str(ref))
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    _edit(model, bns[3].input[3], lambda a: a + 1.0)  # planted in the 4th BN
    report = verify(ref, pair(model, "bug.onnx"), providers="cpu", localize=True)
    assert not report.equivalent
    assert report.localized["first_divergent"] == bns[3].output[0]
    assert "BatchNormalization" in report.localized["producer"]


# -- providers ------------------------------------------------------------------------------

def test_auto_uses_cuda_when_it_works(fake_cuda, pair):
    ref = MODELS / "mlp_bn1d.onnx"
    report = verify(ref, pair(fuse(ref).to_model(), "f.onnx"))
    assert [c.name for c in report.comparisons] == ["cpu", "cuda", "cpu-vs-cuda"]
    assert report.comparisons[2].reference_provider == "CPUExecutionProvider"
    assert report.comparisons[2].candidate_provider == "CUDAExecutionProvider"
    strict, loose = report.comparisons[1].outputs[0], report.comparisons[2].outputs[0]
    assert loose.rtol == pytest.approx(strict.rtol * CROSS_PROVIDER_FACTOR)
    assert not report.skipped


def test_auto_skips_cuda_and_says_why(monkeypatch):
    monkeypatch.setattr(runner, "cuda_status", lambda: (False, "no GPU here"))
    assert parse_providers("auto") == (["cpu"], [{"name": "cuda", "why": "no GPU here"}])
    with pytest.raises(BnfoldError, match="CUDA is not usable here: no GPU here"):
        parse_providers("cuda")
    with pytest.raises(BnfoldError, match="use auto, cpu, cuda"):
        parse_providers("tpu")


def test_cuda_detection_checks_the_session_not_the_list(monkeypatch):
    class FakeSession:
        def __init__(self, *a, **k):
            pass

        def get_providers(self):
            return ["CPUExecutionProvider"]

    class FakeOrt:
        SessionOptions = runner.ort().SessionOptions
        GraphOptimizationLevel = runner.ort().GraphOptimizationLevel
        InferenceSession = FakeSession

        @staticmethod
        def get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    runner.cuda_status.cache_clear()
    monkeypatch.setattr(runner, "ort", lambda: FakeOrt)
    monkeypatch.setattr(runner, "ISOLATE", False)  # FakeOrt replaces the module in this process
    try:
        ok, why = runner.cuda_status()
        assert not ok and "fell back to the CPU" in why
    finally:
        runner.cuda_status.cache_clear()


@pytest.mark.gpu
def test_real_cuda_provider(pair):
    ok, why = runner.cuda_status()
    if not ok:
        pytest.skip(f"no working CUDA execution provider: {why}")
    ref = MODELS / "resnet_mini.onnx"
    report = verify(ref, pair(fuse(ref).to_model(), "f.onnx"), providers="cuda")
    assert report.equivalent
    assert [c.name for c in report.comparisons] == ["cuda", "cpu-vs-cuda"]
    bug = verify(ref, pair(dropped_mean(onnx.load(str(ref))), "bug.onnx"), providers="cuda")
    assert not bug.equivalent


def test_scalar_inputs(pair):
    text = """<ir_version: 8, opset_import: ["" : 15]>
    g (bool c, float k, float[N,3] x) => (float[N,3] y) {
        s = Mul (x, k)
        y = If (c) < then_branch = t () => (float[N,3] a) { a = Relu (s) },
                     else_branch = e () => (float[N,3] b) { b = Neg (s) } >
    }"""
    ref = pair(build(text), "ref.onnx")
    report = verify(ref, ref, providers="cpu")
    assert report.equivalent and report.inputs["c"]["shape"] == []
    # the two default samples take both branches: a candidate wrong in one branch only fails
    cand = pair(build(text.replace("b = Neg (s)", "b = Relu (s)")), "cand.onnx")
    assert not verify(ref, cand, providers="cpu").equivalent


def test_outputs_that_are_nan_in_both_models_pass_with_a_note_saying_so(tmp_path):
    """Two models that both compute NaN 'match' (max abs 0): the report must say that this
    checked nothing about those values, not read as a clean pass."""
    model = onnx.load(str(MODELS / "mlp_bn1d.onnx"))
    t = next(t for t in model.graph.initializer if t.name == "fc1.weight")
    w = numpy_helper.to_array(t).copy()
    w[:] = np.nan
    t.CopyFrom(numpy_helper.from_array(w, t.name))
    path = tmp_path / "nan.onnx"
    onnx.save(model, str(path))
    report = verify(path, path, providers="cpu", samples=1)
    assert report.equivalent
    assert any("100% of the reference's values are NaN or inf" in n for n in report.notes), report.notes
    clean = verify(MODELS / "mlp_bn1d.onnx", MODELS / "mlp_bn1d.onnx", providers="cpu", samples=1)
    assert not any("NaN or inf" in n for n in clean.notes), clean.notes
