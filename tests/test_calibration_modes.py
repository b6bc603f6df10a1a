"""The two calibration methods against an independent numpy computation.

A small net (1x1 Convs, global pooling, Gemm, three BNs, 4-D and 2-D activations) is
written out in numpy float64: the default method is torch's update_bn / AdaBN (every BN
normalises with its batch statistics while they are measured), ``exact`` measures each
BN with those upstream at their final statistics.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from bnfold.cli import main
from bnfold.insert import batch_stats_probe, insert, recalibrate
from conftest import bn_params, build, ort_run, rand

EPS = 1e-3


def net(opset: int):
    p = {**bn_params(5, 1, "a"), **bn_params(6, 2, "b"), **bn_params(4, 3, "c")}
    text = f"""<ir_version: 8, opset_import: ["" : {opset}]>
    g (float[N,3,4,4] x) => (float[N,4] y) {{
        h1 = Conv (x, W1)
        a = BatchNormalization <epsilon = {EPS}> (h1, as, ab, am, av)
        r = Relu (a)
        h2 = Conv (r, W2)
        b = BatchNormalization <epsilon = {EPS}> (h2, bs, bb, bm, bv)
        g = GlobalAveragePool (b)
        f = Flatten (g)
        h3 = Gemm (f, W3)
        y = BatchNormalization <epsilon = {EPS}> (h3, cs, cb, cm, cv)
    }}"""
    return build(text, W1=rand(5, 3, 1, 1, seed=4), W2=rand(6, 5, 1, 1, seed=5), W3=rand(6, 4, seed=6), **p), p


def conv1x1(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.einsum("oc,nchw->nohw", w[:, :, 0, 0].astype(np.float64), x)


def bn(x: np.ndarray, mean, var, scale, bias) -> np.ndarray:
    shape = (1, -1) + (1,) * (x.ndim - 2)
    r = lambda v: np.asarray(v, np.float64).reshape(shape)  # noqa: E731
    return (x - r(mean)) / np.sqrt(r(var) + EPS) * r(scale) + r(bias)


def moments(x: np.ndarray):
    v = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
    return v.mean(1), v.var(1), v.shape[1]


def numpy_reference(model, p, batches: List[np.ndarray], exact: bool) -> Dict[str, tuple]:
    """Population statistics of the three BN inputs, as float64 numpy computes them."""
    w = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    acc = {k: [] for k in "abc"}
    final: Dict[str, tuple] = {}

    def step(name, h, k):
        if exact and name in final:  # a later wave: normalise with the final statistics
            return bn(h, *final[name], p[f"{name}s"], p[f"{name}b"])
        mean, var, m = moments(h)
        acc[name].append((mean, var * m / (m - 1)))
        return bn(h, mean, var, p[f"{name}s"], p[f"{name}b"])  # batch statistics (biased var)

    def forward(x, upto):
        h1 = conv1x1(w["W1"], x.astype(np.float64))
        if upto == "a":
            return step("a", h1, 0)
        r = np.maximum(step("a", h1, 0), 0)
        h2 = conv1x1(w["W2"], r)
        if upto == "b":
            return step("b", h2, 0)
        f = step("b", h2, 0).mean(axis=(2, 3))
        return step("c", f @ w["W3"].astype(np.float64), 0)

    if exact:
        for name in "abc":  # one wave per BN: each chain link is downstream of the last
            for x in batches:
                forward(x, name)
            final[name] = tuple(np.mean([a[i] for a in acc[name]], 0) for i in (0, 1))
        return final
    for x in batches:
        forward(x, "c")
    return {k: tuple(np.mean([a[i] for a in v], 0) for i in (0, 1)) for k, v in acc.items()}


def stats_of(model) -> Dict[str, tuple]:
    w = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.output[0][0] if n.output[0] != "y" else "c": (w[n.input[3]], w[n.input[4]])
            for n in model.graph.node if n.op_type == "BatchNormalization"}


@pytest.mark.parametrize("opset", [13, 15, 18])
@pytest.mark.parametrize("exact", [False, True])
def test_recalibrate_matches_numpy(opset, exact):
    model, p = net(opset)
    batches = [rand(4, 3, 4, 4, seed=10 + k, scale=2.0) + 1.0 for k in range(3)]
    result = recalibrate(model, [{"x": x} for x in batches], batch_size=4, exact=exact)
    assert result.calibration.passes == (3 if exact else 1)
    assert result.calibration.method == ("exact" if exact else "batch")
    want = numpy_reference(model, p, batches, exact)
    got = stats_of(result.model)
    for name in "abc":
        np.testing.assert_allclose(got[name][0], want[name][0], rtol=2e-5, atol=2e-6 * np.abs(want[name][0]).max())
        np.testing.assert_allclose(got[name][1], want[name][1], rtol=2e-5)
    # the methods differ where upstream batch statistics are noisy: the test can tell them apart
    other = numpy_reference(model, p, batches, not exact)
    assert not np.allclose(other["c"][1], want["c"][1], rtol=1e-3)


def test_batch_method_momentum_matches_numpy():
    model, p = net(15)
    batches = [rand(4, 3, 4, 4, seed=20 + k) for k in range(3)]
    result = recalibrate(model, [{"x": x} for x in batches], batch_size=4, estimator="momentum", momentum=0.5)
    w = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    mean, var = np.zeros(5), np.ones(5)
    for x in batches:
        mu, v, m = moments(conv1x1(w["W1"], x.astype(np.float64)))
        mean, var = 0.5 * mean + 0.5 * mu, 0.5 * var + 0.5 * v * m / (m - 1)
    got = stats_of(result.model)["a"]
    np.testing.assert_allclose(got[0], mean, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], var, rtol=2e-5)
    assert result.calibration.data_weight == pytest.approx(1 - 0.5 ** 3)


def test_probe_normalises_like_a_training_mode_bn():
    """The probe's replacement of a BN computes numpy's batch normalisation of its input."""
    model, p = net(15)
    probe, taps = batch_stats_probe(model, [n.name or "" for n in model.graph.node
                                            if n.op_type == "BatchNormalization"][:0], normalize=True)
    assert taps == {}  # unnamed BNs are not targets: the copy is unchanged
    for n, k in zip((n for n in model.graph.node if n.op_type == "BatchNormalization"), "abc"):
        n.name = k
    probe, taps = batch_stats_probe(model, ["a", "b", "c"], normalize=True)
    probe.graph.output.extend([model.graph.output[0]])
    x = rand(3, 3, 4, 4, seed=30)
    outs = dict(zip([o.name for o in probe.graph.output], ort_run(probe, {"x": x})))
    w = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    h1 = conv1x1(w["W1"], x.astype(np.float64))
    mean, var, _ = moments(h1)
    np.testing.assert_allclose(outs[taps["a"][0]].reshape(-1), mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(outs[taps["a"][1]].reshape(-1), var, rtol=1e-6)
    assert taps["a"].values_per_channel(outs[taps["a"].shape]) == 3 * 4 * 4
    assert taps["c"].values_per_channel(outs[taps["c"].shape]) == 3
    assert outs["y"].dtype == np.float32 and outs["y"].shape == (3, 4)


def test_float16_model_batch_method():
    model = build("""<ir_version: 8, opset_import: ["" : 15]>
    g (float16[N,3,4,4] x) => (float16[N,4,4,4] y) {
        h = Conv (x, W)
        y = BatchNormalization (h, s, b, m, v)
    }""", W=rand(4, 3, 1, 1, dtype=np.float16), s=np.ones(4, np.float32), b=np.zeros(4, np.float32),
                  m=np.zeros(4, np.float32), v=np.ones(4, np.float32))
    x = rand(8, 3, 4, 4, dtype=np.float16)
    result = recalibrate(model, [{"x": x}], batch_size=8)
    mean, var = stats_of(result.model)["c"]  # the BN writing y
    assert mean.dtype == np.float32
    h = np.einsum("oc,nchw->nohw", numpy_helper.to_array(model.graph.initializer[0])[:, :, 0, 0].astype(np.float64),
                  x.astype(np.float64))
    mu, v, m = moments(h)
    np.testing.assert_allclose(mean, mu, atol=2e-3 * np.abs(mu).max())  # ORT's float16 Conv rounds its output
    np.testing.assert_allclose(var, v * m / (m - 1), rtol=5e-3)


def test_insert_normalize_default_and_exact_differ_as_numpy_says():
    model, _ = net(15)
    batches = [rand(2, 3, 4, 4, seed=40 + k) for k in range(4)]
    a = insert(model, ops=["Conv"], calibration=[{"x": x} for x in batches], batch_size=2, mode="normalize")
    b = insert(model, ops=["Conv"], calibration=[{"x": x} for x in batches], batch_size=2, mode="normalize",
               exact=True)
    assert a.calibration.passes == 1 and b.calibration.passes == 2 and a.calibration.method == "batch"
    # the first inserted BN sees the same activations either way
    first = lambda r: numpy_helper.to_array(next(t for t in r.model.graph.initializer  # noqa: E731
                                                 if t.name.endswith(".var")))
    np.testing.assert_allclose(first(a), first(b), rtol=1e-6)


def test_cli_exact_flag_and_progress_free_output(tmp_path):
    import onnx

    model, _ = net(15)
    for n, k in zip((n for n in model.graph.node if n.op_type == "BatchNormalization"), "abc"):
        n.name = k
    onnx.save(model, tmp_path / "n.onnx")
    np.savez(tmp_path / "d.npz", x=rand(16, 3, 4, 4, seed=50))
    r = CliRunner()
    res = r.invoke(main, ["recalibrate", str(tmp_path / "n.onnx"), "--calibration", str(tmp_path / "d.npz")])
    assert res.exit_code == 0 and "1 pass(es) (batch statistics upstream)" in res.output, res.output
    res = r.invoke(main, ["recalibrate", str(tmp_path / "n.onnx"), "--calibration", str(tmp_path / "d.npz"),
                          "--exact", "-o", str(tmp_path / "e.onnx")])
    assert res.exit_code == 0 and "3 pass(es) (exact)" in res.output, res.output
    res = r.invoke(main, ["insert", str(tmp_path / "n.onnx"), "--exact"])
    assert res.exit_code == 2 and "--exact applies only with --calibration" in res.output


def test_readme_insert_and_recalibrate_commands_run(tmp_path):
    """The README's insert/recalibrate examples run as written (on a small model and data)."""
    import re
    import shlex
    import shutil
    import subprocess
    import sys

    from conftest import MODELS, ROOT

    section = (ROOT / "README.md").read_text().split("### insert and recalibrate", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    shutil.copy(MODELS / "resnet_mini.onnx", tmp_path / "model.onnx")
    np.savez(tmp_path / "data.npz", input=rand(8, 3, 32, 32, seed=60))
    (tmp_path / "data").mkdir()
    np.savez(tmp_path / "data" / "a.npz", input=rand(8, 3, 32, 32, seed=61))
    np.savez(tmp_path / "new_domain.npz", input=rand(8, 3, 32, 32, seed=62) * 2 + 1)
    commands = [ln.split("  #")[0].strip() for ln in block.splitlines() if ln.strip()]
    assert len(commands) >= 4
    for command in commands:
        args = shlex.split(command)
        proc = subprocess.run([sys.executable, "-m", "bnfold", *args[1:]], cwd=tmp_path, capture_output=True,
                              text=True)
        assert proc.returncode == 0, (command, proc.stderr)


@pytest.mark.parametrize("length", ["6", "L"])  # positions known from the model, or read at run time
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_probe_statistics_of_3d_activations_match_numpy(dtype, length):
    """[N, C, L] inputs (1-D feature maps; float64 takes the Reshape path) against numpy."""
    elem = "float" if dtype == np.float32 else "double"
    model = build(f"""<ir_version: 8, opset_import: ["" : 15]>
    g ({elem}[N,4,{length}] x) => ({elem}[N,4,{length}] y) {{
        y = BatchNormalization (x, s, b, m, v)
    }}""", s=np.ones(4, dtype), b=np.zeros(4, dtype), m=np.zeros(4, dtype), v=np.ones(4, dtype))
    model.graph.node[0].name = "bn"
    probe, taps = batch_stats_probe(model, ["bn"], normalize=True)
    x = (rand(5, 4, 6, seed=70, scale=3.0) + 2.0).astype(dtype)
    outs = dict(zip([o.name for o in probe.graph.output], ort_run(probe, {"x": x})))
    mean, var, m = moments(x.astype(np.float64))
    np.testing.assert_allclose(outs[taps["bn"][0]].reshape(-1), mean, rtol=1e-6)
    np.testing.assert_allclose(outs[taps["bn"][1]].reshape(-1), var, rtol=1e-5)
    assert taps["bn"].values_per_channel(outs[taps["bn"].shape]) == m == 30


def test_exact_wave_model_keeps_what_a_subgraph_reads_from_outside():
    """A wave's model is cut to the nodes its measured tensors need, counting names that an If
    branch reads from the enclosing graph; the exact statistics still match numpy."""
    from bnfold.insert import _model_up_to

    model = build("""<ir_version: 8, opset_import: ["" : 15]>
    g (float[N,2,3,3] x) => (float[N,2,3,3] y, float[N,2,3,3] z) {
        h = Relu (x)
        k = Neg (x)
        c = Constant <value = bool {1}> ()
        a = If (c) <then_branch = t () => (float[N,2,3,3] o) { o = Identity (h) },
                    else_branch = e () => (float[N,2,3,3] o2) { o2 = Identity (x) }>
        y = BatchNormalization (a, s, b, m, v)
        z = Abs (k)
    }""", s=np.ones(2, np.float32), b=np.zeros(2, np.float32), m=np.zeros(2, np.float32), v=np.ones(2, np.float32))
    cut = _model_up_to(model, ["a"])
    assert [n.op_type for n in cut.graph.node] == ["Relu", "Constant", "If"]  # h kept for the branch, k/z cut
    assert [o.name for o in cut.graph.output] == ["a"]
    x = rand(4, 2, 3, 3, seed=80)
    result = recalibrate(model, [{"x": x}], batch_size=4, exact=True)
    mean, var, m = moments(np.maximum(x, 0).astype(np.float64))
    got = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    bn = next(n for n in result.model.graph.node if n.op_type == "BatchNormalization")
    np.testing.assert_allclose(got[bn.input[3]], mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got[bn.input[4]], var * m / (m - 1), rtol=1e-5)
