"""The pure fold arithmetic against plain float64 numpy written out index by index."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold import numerics

settings.register_profile("ci", max_examples=60, deadline=None)
settings.load_profile("ci")


@st.composite
def grouped(draw):
    group = draw(st.integers(1, 4))
    c_in_g = draw(st.integers(1, 3))
    c_out_g = draw(st.integers(1, 3))
    rank = draw(st.integers(0, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    seed = draw(st.integers(0, 2**31))
    return group, c_in_g, c_out_g, kernel, np.random.default_rng(seed)


def test_bn_affine_matches_the_definition():
    rng = np.random.default_rng(0)
    g, b, m = rng.normal(size=(3, 7))
    v = 10.0 ** rng.uniform(-4, 3, 7)
    s, t = numerics.bn_affine(g, b, m, v, 1e-3)
    x = rng.normal(size=(5, 7))
    np.testing.assert_allclose(s * x + t, g * (x - m) / np.sqrt(v + 1e-3) + b, rtol=1e-13, atol=1e-13)


@given(grouped())
def test_conv_transpose_scales_each_output_channel(case):
    group, c_in_g, c_out_g, kernel, rng = case
    w = rng.normal(size=(group * c_in_g, c_out_g) + kernel)
    s = rng.normal(size=group * c_out_g)
    got = numerics.scale(w, numerics.conv_transpose_factor(s, w.shape, group))
    expected = w.copy()
    for i in range(group * c_in_g):
        for j in range(c_out_g):
            expected[i, j] *= s[(i // c_in_g) * c_out_g + j]
    np.testing.assert_array_equal(got, expected)


@given(grouped())
def test_conv_input_scaling_and_shift(case):
    group, c_in_g, c_out_g, kernel, rng = case
    w = rng.normal(size=(group * c_out_g, c_in_g) + kernel)
    s = rng.normal(size=group * c_in_g)
    t = rng.normal(size=group * c_in_g)
    got_w = numerics.scale(w, numerics.conv_input_factor(s, w.shape, group))
    got_b = numerics.conv_input_shift(w, t, group)
    exp_w = w.copy()
    exp_b = np.zeros(group * c_out_g)
    for o in range(group * c_out_g):
        for i in range(c_in_g):
            c = (o // c_out_g) * c_in_g + i
            exp_w[o, i] *= s[c]
            exp_b[o] += w[o, i].sum() * t[c]
    np.testing.assert_array_equal(got_w, exp_w)
    np.testing.assert_allclose(got_b, exp_b, rtol=1e-12, atol=1e-12)


@given(st.integers(1, 4), st.integers(1, 6), st.integers(0, 2**31))
def test_axis_factor(ndim, n, seed):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(1, 4, ndim))
    axis = int(rng.integers(0, ndim))
    shape = shape[:axis] + (n,) + shape[axis + 1:]
    w = rng.normal(size=shape)
    s = rng.normal(size=n)
    got = numerics.scale(w, numerics.axis_factor(s, axis, ndim))
    for idx in itertools.product(*map(range, shape)):
        assert got[idx] == w[idx] * s[idx[axis]]


@pytest.mark.parametrize("dtype,big", [(np.float16, 7e4), (np.float32, 4e38)])
def test_round_to_refuses_overflow(dtype, big):
    with pytest.raises(numerics.FoldOverflow) as e:
        numerics.round_to(np.array([1.0, big]), dtype, "w")
    assert np.dtype(dtype).name in str(e.value)
    ok = numerics.round_to(np.array([1.0, 65000.0]), np.float16, "w")
    assert ok.dtype == np.float16 and np.isfinite(ok).all()


@given(st.lists(st.floats(-6e4, 6e4, allow_nan=False), min_size=1, max_size=20))
def test_round_to_rounds_once_to_nearest(values):
    v = np.array(values)
    got = numerics.round_to(v, np.float16, "w")
    # nearest float16: no representable float16 is strictly closer
    up = np.nextafter(got, np.float16(np.inf))
    down = np.nextafter(got, np.float16(-np.inf))
    err = np.abs(got.astype(np.float64) - v)
    assert np.all(err <= np.abs(up.astype(np.float64) - v) + 0)
    assert np.all(err <= np.abs(down.astype(np.float64) - v) + 0)


@pytest.mark.parametrize("shape,axis", [((300, 70, 3, 3), 0), ((7, 40000), 1), ((3, 64, 1024), -1), ((1, 5, 70000), 0)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_blockwise_scale_round_equals_one_shot(shape, axis, dtype):
    rng = np.random.default_rng(0)
    w = rng.normal(size=shape).astype(dtype)
    s = rng.normal(size=shape[axis])
    factor = numerics.axis_factor(s, axis, len(shape))
    expected = (w.astype(np.float64) * factor).astype(dtype)
    np.testing.assert_array_equal(numerics.scale_round(w, factor, dtype, "w"), expected)


def test_blockwise_overflow_is_refused():
    w = np.full((200, 1000), 300.0, np.float16)
    s = np.ones(200)
    s[150] = 1000.0
    with pytest.raises(numerics.FoldOverflow):
        numerics.scale_round(w, numerics.axis_factor(s, 0, 2), np.float16, "w")


@given(st.integers(0, 2**31), st.sampled_from([np.float16, np.float32]))
def test_check_scale_fits_agrees_with_computing_the_product(seed, dtype):
    rng = np.random.default_rng(seed)
    w = (rng.normal(size=(6, 3, 2)) * 10.0 ** rng.uniform(0, 4)).astype(dtype)
    specials = rng.random(w.shape) < rng.choice([0.0, 0.2])  # NaN and inf among the weights, in some draws
    w[specials] = rng.choice(np.array([np.nan, np.inf, -np.inf], dtype), size=int(specials.sum()))
    axis = int(rng.integers(0, 3))
    s = 10.0 ** rng.uniform(-2, 36 if dtype == np.float32 else 4, size=w.shape[axis])
    factor = numerics.axis_factor(s, axis, 3)
    try:
        numerics.scale_round(w, factor, dtype, "w")
        fits = True
    except numerics.FoldOverflow:
        fits = False
    try:
        numerics.check_scale_fits(w, factor, dtype, "w")
        assert fits
    except numerics.FoldOverflow:
        assert not fits


def test_a_nan_weight_does_not_hide_an_overflowing_one():
    w = np.array([[np.nan, 3e38], [1.0, 2.0]], np.float32)  # corrupt data: NaN beside a finite peak
    factor = numerics.axis_factor(np.array([2.0, 1.0]), 0, 2)
    with pytest.raises(numerics.FoldOverflow):
        numerics.scale_round(w, factor, np.float32, "w")
    with pytest.raises(numerics.FoldOverflow):
        numerics.check_scale_fits(w, factor, np.float32, "w")


@pytest.mark.parametrize("axis", [0, 1, 3])
def test_check_scale_fits_block_by_block(axis):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(900, 70, 3, 3)).astype(np.float16)
    s = np.ones(w.shape[axis])
    numerics.check_scale_fits(w, numerics.axis_factor(s, axis, 4), np.float16, "w")
    w[450, 35, 1, 1] = 60000.0
    s[:] = 1.5
    with pytest.raises(numerics.FoldOverflow):
        numerics.check_scale_fits(w, numerics.axis_factor(s, axis, 4), np.float16, "w")


@pytest.mark.parametrize("shape", [(4, 3), (300, 70, 3, 3)])  # one shot, and block by block
def test_scale_round_into_a_given_buffer(shape):
    rng = np.random.default_rng(1)
    w = rng.normal(size=shape).astype(np.float32)
    factor = numerics.axis_factor(rng.normal(size=shape[0]), 0, len(shape))
    out = np.full(shape, np.nan, np.float32)
    got = numerics.scale_round(w, factor, np.float32, "w", out=out)
    assert got is out
    np.testing.assert_array_equal(out, (w.astype(np.float64) * factor).astype(np.float32))


@pytest.mark.parametrize("flags", [True, False])  # the overflow flag's fast path, and the careful path
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("case", ["normal", "specials", "overflow"])
def test_scale_round_block_paths_agree_with_numpy(monkeypatch, flags, dtype, case):
    """Large weights (block by block): the values are numpy's float64 product rounded once, NaN and
    inf stay what they are, and a finite value that overflows raises, on both paths."""
    monkeypatch.setattr(numerics, "_CAST_FLAGS", {np.dtype(dtype): flags})
    rng = np.random.default_rng(5)
    w = rng.normal(size=(300, 70, 3, 3)).astype(dtype)
    s = rng.uniform(0.1, 3.0, size=300)
    if case != "normal":
        w[7, 3, 1, 1], w[150, 0, 0, 0], w[299, 69, 2, 2] = np.nan, np.inf, -np.inf
    if case == "overflow":
        w[200, 5, 0, 0] = np.finfo(dtype).max
        s[200] = 1.5
    factor = numerics.axis_factor(s, 0, 4)
    with np.errstate(over="ignore", invalid="ignore"):
        want = (w.astype(np.float64) * factor).astype(dtype)
    if case == "overflow":
        with pytest.raises(numerics.FoldOverflow):
            numerics.scale_round(w, factor, dtype, "w")
        return
    got = numerics.scale_round(w, factor, dtype, "w")
    np.testing.assert_array_equal(got, want)


def test_the_overflow_flag_is_probed_not_assumed():
    numerics._CAST_FLAGS.clear()
    assert numerics._cast_flags_overflow(np.dtype(np.float32)) in (True, False)
    assert numerics._cast_flags_overflow(np.dtype(np.float64)) is False  # not a rounding target it knows
