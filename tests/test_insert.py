"""insert and recalibrate: the properties the BN paper's statistics must have.

Statistics are checked against an independent computation: activations taken from
ONNX Runtime on the unmodified model, estimators written out here in numpy.
"""
from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from bnfold import fuse
from bnfold.cli import main
from bnfold.insert import identity_variance, insert, recalibrate
from bnfold.verification import verify
from conftest import MODELS, build, check, ort_run, rand

BATCH = 8


def calib(shape, n_batches=4, seed=0):
    rng = np.random.default_rng(seed)
    return [{"input": rng.normal(size=(BATCH,) + shape).astype(np.float32)} for _ in range(n_batches)]


def folded(name):
    return fuse(MODELS / name).to_model()


def activations(model, names, feeds):
    """Intermediate tensors of ``model`` straight from ONNX Runtime (optimisations off)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return dict(zip(names, sess.run(names, feeds)))


def numpy_population(batches):
    means, vars_ = [], []
    for x in batches:
        v = np.moveaxis(x.astype(np.float64), 1, 0).reshape(x.shape[1], -1)
        m = v.shape[1]
        means.append(v.mean(1))
        vars_.append(v.var(1) * m / (m - 1))
    return np.mean(means, 0), np.mean(vars_, 0)


def numpy_momentum(batches, k):
    mean, var = 0.0, 1.0
    for x in batches:
        v = np.moveaxis(x.astype(np.float64), 1, 0).reshape(x.shape[1], -1)
        m = v.shape[1]
        mean = k * mean + (1 - k) * v.mean(1)
        var = k * var + (1 - k) * v.var(1) * m / (m - 1)
    return mean, var


def params(model, bn):
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [inits[i] for i in bn.input[1:5]]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.1])
def test_identity_variance_is_exact_in_the_dtype(dtype, eps):
    v = identity_variance(np.dtype(dtype), eps)
    total = np.asarray(v + dtype(eps), dtype=dtype)
    assert total == 1 and np.sqrt(total) == 1


@pytest.mark.parametrize("name", ["resnet_mini.onnx", "mobilenet_mini.onnx", "mlp_bn1d.onnx", "decoder_deconv.onnx"])
def test_identity_insert_is_bit_exact(name):
    model = folded(name)
    result = insert(model)
    check(result.model)
    assert any(r.inserted for r in result.records)
    feeds = {"input": rand(*[d.dim_value or 2 for d in model.graph.input[0].type.tensor_type.shape.dim])}
    for a, b in zip(ort_run(model, feeds), ort_run(result.model, feeds)):
        assert np.array_equal(a, b)


def test_identity_insert_float16_is_bit_exact():
    model = build("""<ir_version: 8, opset_import: ["" : 15]>
    g (float16[N,3,6,6] x) => (float16[N,4,6,6] y) { c = Conv <pads = [1, 1, 1, 1]> (x, W)  y = Relu (c) }""",
                  W=rand(4, 3, 3, 3, dtype=np.float16))
    result = insert(model)
    feeds = {"x": rand(2, 3, 6, 6, dtype=np.float16)}
    assert np.array_equal(ort_run(model, feeds)[0], ort_run(result.model, feeds)[0])


@pytest.mark.parametrize("estimator", ["population", "momentum"])
def test_statistics_equal_an_independent_numpy_estimate(estimator):
    model = folded("resnet_mini.onnx")
    data = calib((3, 32, 32))
    result = insert(model, calibration=data, batch_size=BATCH, estimator=estimator, momentum=0.9)
    bns = [n for n in result.model.graph.node if n.op_type == "BatchNormalization"]
    tensors = [r.tensor for r in result.records if r.inserted]
    acts = [activations(model, tensors, d) for d in data]
    for bn, tensor in zip(bns, tensors):
        batches = [a[tensor] for a in acts]
        mean, var = numpy_population(batches) if estimator == "population" else numpy_momentum(batches, 0.9)
        _, _, got_mean, got_var = params(result.model, bn)
        np.testing.assert_allclose(got_mean, mean, rtol=1e-5, atol=1e-6 * np.abs(mean).max())
        np.testing.assert_allclose(got_var, var, rtol=1e-5)


def test_preserve_mode_with_data_passes_verify(tmp_path):
    model = folded("mobilenet_mini.onnx")
    result = insert(model, calibration=calib((3, 32, 32)), batch_size=BATCH)
    (tmp_path / "a.onnx").write_bytes(model.SerializeToString())
    (tmp_path / "b.onnx").write_bytes(result.model.SerializeToString())
    assert verify(tmp_path / "a.onnx", tmp_path / "b.onnx", providers="cpu").equivalent


def test_round_trip_fuse_insert_gives_back_the_weights():
    model = folded("resnet_mini.onnx")
    again = fuse(insert(model, calibration=calib((3, 32, 32)), batch_size=BATCH).model).to_model()
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in again.graph.initializer}
    for conv in (n for n in model.graph.node if n.op_type == "Conv"):
        w0 = before[conv.input[1]]
        w1 = after[next(n for n in again.graph.node if n.name == conv.name).input[1]]
        np.testing.assert_allclose(w1, w0, rtol=4e-7, atol=1e-7 * np.abs(w0).max())


def test_exact_normalize_mode_standardises_activations():
    """On the calibration data each inserted BN's output has, per channel, batch means that
    average to 0 and unbiased batch variances (the m/(m-1) correction) that average to 1."""
    model = folded("resnet_mini.onnx")
    data = calib((3, 32, 32))
    result = insert(model, calibration=data, batch_size=BATCH, mode="normalize", exact=True)
    outs = [r.tensor for r in result.records if r.inserted]
    acts = [activations(result.model, outs, d) for d in data]
    bns = {n.output[0]: n for n in result.model.graph.node if n.op_type == "BatchNormalization"}
    for name in outs:
        mean, var = numpy_population([a[name] for a in acts])
        v = params(result.model, bns[name])[3].astype(np.float64)
        np.testing.assert_allclose(mean, 0, atol=1e-4)
        np.testing.assert_allclose(var, v / (v + 1e-5), rtol=1e-3)  # 1, but for epsilon


def test_exact_recalibrated_statistics_match_the_model_they_are_in():
    data = calib((3, 32, 32), seed=5)
    shifted = [{"input": d["input"] * 2.0 + 0.5} for d in data]  # a new domain
    original = onnx.load(str(MODELS / "resnet_mini.onnx"))
    result = recalibrate(original, shifted, batch_size=BATCH, exact=True)
    assert len(result.recalibrated) == 13 and not result.skipped
    bns = [n for n in result.model.graph.node if n.op_type == "BatchNormalization"]
    acts = [activations(result.model, [b.input[0] for b in bns], d) for d in shifted]
    old = {n.name: params(original, n) for n in original.graph.node if n.op_type == "BatchNormalization"}
    for bn in bns:
        mean, var = numpy_population([a[bn.input[0]] for a in acts])
        scale, bias, got_mean, got_var = params(result.model, bn)
        np.testing.assert_allclose(got_mean, mean, rtol=1e-4, atol=1e-5 * np.abs(mean).max())
        np.testing.assert_allclose(got_var, var, rtol=1e-4)
        assert np.array_equal(scale, old[bn.name][0]) and np.array_equal(bias, old[bn.name][1])


def test_post_activation_placement_and_refusals():
    model = build("""<ir_version: 8, opset_import: ["" : 15]>
    g (float[N,5] x, float[2,4,5] t) => (float[N,6] y, float[N,6] u, float[2,4,6] z) {
        c = Gemm (x, W)
        y = Relu (c)
        u = Gemm (x, W)
        z = MatMul (t, W)
    }""", W=rand(5, 6))
    result = insert(model, position="post-activation")
    reasons = [(r.host_op, r.inserted, r.reason and r.reason.value) for r in result.records]
    assert reasons == [("Gemm", True, None), ("Gemm", False, "NO_ACTIVATION"),
                       ("MatMul", False, "CHANNEL_AXIS_MISMATCH")]
    bn = next(n for n in result.model.graph.node if n.op_type == "BatchNormalization")
    assert bn.output[0] == "y"  # after the Relu, under the graph output's own name
    check(result.model)


def test_calibration_formats_and_rebatching(tmp_path):
    model = folded("mlp_bn1d.onnx")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 64)).astype(np.float32)
    (tmp_path / "d").mkdir()
    for k in range(4):  # chunks of 10 re-cut into batches of 8
        np.savez(tmp_path / "d" / f"{k}.npz", input=x[10 * k:10 * (k + 1)])
    np.save(tmp_path / "x.npy", x)
    results = [insert(model, calibration=src, batch_size=8) for src in
               (tmp_path / "d", tmp_path / "x.npy", [{"input": x[:20]}, {"input": x[20:]}])]
    assert [r.calibration.batches for r in results] == [5, 5, 5]
    first = [numpy_helper.to_array(t) for t in results[0].model.graph.initializer]
    for r in results[1:]:
        for a, b in zip(first, [numpy_helper.to_array(t) for t in r.model.graph.initializer]):
            assert np.array_equal(a, b)


def test_cli_insert_and_recalibrate(tmp_path):
    src = tmp_path / "m.onnx"
    shutil.copy(MODELS / "resnet_mini.onnx", src)
    np.savez(tmp_path / "cal.npz", input=np.concatenate([d["input"] for d in calib((3, 32, 32))]))
    runner = CliRunner()
    res = runner.invoke(main, ["recalibrate", str(src), "--calibration", str(tmp_path / "cal.npz")])
    assert res.exit_code == 0, res.output
    assert "13 BatchNormalization recalibrated" in res.output
    res = runner.invoke(main, ["insert", str(src), "--op", "Gemm", "--calibration", str(tmp_path / "cal.npz"),
                               "--mode", "normalize"])
    assert res.exit_code == 0 and "1 BatchNormalization inserted" in res.output and "on purpose" in res.output
    check(onnx.load(str(tmp_path / "m.bn.onnx")))
    res = runner.invoke(main, ["insert", str(src), "--calibration", str(tmp_path / "missing.npz")])
    assert res.exit_code == 2 and "no such calibration" in res.output


def test_recalibrate_skips_with_refusal_codes_in_the_result_and_the_json(tmp_path):
    from bnfold.reasons import Reason, Refusal

    p = {**{k: v for k, v in zip(("s", "b", "m", "v"), (np.ones(3, np.float32), np.zeros(3, np.float32),
                                                         np.zeros(3, np.float32), np.ones(3, np.float32)))}}
    model = build("""<ir_version: 8, opset_import: ["" : 15]>
    g (float[N,3,4,4] x) => (float[N,3,4,4] y, float[N,3,4,4] z, float[N,3,4,4] w) {
        y, rm, rv = BatchNormalization <training_mode = 1> (x, s, b, m, v)
        vin = Abs (v)
        z = BatchNormalization (x, s, b, m, vin)
        w = BatchNormalization (x, s, b, m, v)
    }""", **p)
    for n, name in zip([n for n in model.graph.node if n.op_type == "BatchNormalization"], ("train", "given", "ok")):
        n.name = name
    result = recalibrate(model, [{"x": rand(4, 3, 4, 4)}], batch_size=4)
    assert result.recalibrated == ["ok"]
    assert [(s.node, s.refusal.reason) for s in result.skipped] == [("train", Reason.TRAINING_MODE),
                                                                    ("given", Reason.NOT_CONSTANT)]
    assert all(isinstance(s.refusal, Refusal) and s.node in s.refusal.detail for s in result.skipped)
    assert result.to_dict()["skipped"][0] == {"node": "train", "reason": "TRAINING_MODE",
                                              "detail": result.skipped[0].refusal.detail}
    onnx.save(model, tmp_path / "three.onnx")
    np.savez(tmp_path / "d.npz", x=rand(4, 3, 4, 4))
    res = CliRunner().invoke(main, ["recalibrate", str(tmp_path / "three.onnx"), "--calibration",
                                    str(tmp_path / "d.npz"), "--batch-size", "4"])
    assert "skipped 'train': TRAINING_MODE: " in res.output and "skipped 'given': NOT_CONSTANT: " in res.output
