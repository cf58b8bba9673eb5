"""The few_rows fp32 kernel (streaming/cpu/few_rows.c): right sums, batch-independent rows, and a
build that falls back cleanly where it cannot happen."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

from omni2.streaming.cpu import few_rows, prepack

from cpu_marks import needs  # noqa: E402

needs_kernel = needs("avx512", "cc")


@pytest.fixture(scope="module")
def kernel():
    k = few_rows.kernel()
    assert k is not None, "an AVX-512 machine with a compiler must build the kernel (see the log)"
    return k


def reference(x, w, b=None):
    """The exact sum (float64) and a bound on any fp32 evaluation's error: K u sum|x w| (u = 2^-24),
    doubled for room."""
    exact = x.double() @ w.double().t() + (0 if b is None else b.double())
    bound = 2 * x.size(1) * 2.0 ** -24 * (x.double().abs() @ w.double().abs().t()) + 1e-30
    if b is not None:
        bound = bound + 2.0 ** -24 * exact.abs()
    return exact, bound


@needs_kernel
@pytest.mark.parametrize("rows,n,k", [(1, 48, 16), (3, 100, 200), (9, 47, 129), (17, 300, 896), (40, 97, 257)])
@pytest.mark.parametrize("bias", [False, True])
def test_sums_are_fp32_accurate_for_any_shape(kernel, rows, n, k, bias):
    """Odd output counts (a partly filled 48-column block), k not a multiple of the 128-step
    chunk, row counts that leave a short register pass."""
    g = torch.Generator().manual_seed(rows * 1000 + n)
    w, x = torch.randn(n, k, generator=g), torch.randn(rows, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    got = kernel.linear(x, kernel.pack(w), n, b)
    exact, bound = reference(x, w, b)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    assert bool(((got.double() - exact).abs() <= bound).all())
    assert not torch.equal(bound, torch.zeros_like(bound))  # (the bound is not vacuous)
    # and it is the product F.linear computes, to fp32 rounding
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-4)


@needs_kernel
def test_a_rows_result_does_not_depend_on_the_batch(kernel):
    """Bitwise: a row alone, among 3, 8, 9, 16 or 33 others, at any place in the batch."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(130, 300, generator=g)
    packed = kernel.pack(w)
    row = torch.randn(1, 300, generator=g)
    alone = kernel.linear(row, packed, 130)
    for others in (2, 7, 8, 15, 32):
        batch = torch.randn(others + 1, 300, generator=g)
        for place in (0, others // 2, others):
            batch[place] = row[0]
            assert torch.equal(kernel.linear(batch, packed, 130)[place], alone[0]), (others, place)


@needs_kernel
def test_threads_do_not_change_the_result(kernel):
    from omni2.streaming.cpu.threads import in_fresh_thread

    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(500, 96, generator=g), torch.randn(6, 96, generator=g)
    packed = kernel.pack(w)
    one = in_fresh_thread(kernel.linear, x, packed, 500, threads=1)
    two = in_fresh_thread(kernel.linear, x, packed, 500, threads=2)
    assert torch.equal(one, two)


@needs_kernel
def test_bad_input_is_refused_and_empty_input_is_empty(kernel):
    packed = kernel.pack(torch.randn(10, 32))
    with pytest.raises(ValueError, match="fp32 CPU rows"):
        kernel.linear(torch.randn(2, 32, dtype=torch.float64), packed, 10)
    with pytest.raises(ValueError, match=r"\[M, 32\]"):
        kernel.linear(torch.randn(2, 31), packed, 10)
    assert kernel.linear(torch.randn(0, 32), packed, 10).shape == (0, 10)
    # a non-contiguous view is read correctly
    x = torch.randn(32, 4).t()
    torch.testing.assert_close(kernel.linear(x, packed, 10), F.linear(x, packed.transpose(1, 2).reshape(-1, 32)[:10]))


@needs_kernel
def test_the_build_is_cached_per_source(tmp_path, monkeypatch):
    first = few_rows.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    monkeypatch.setenv("CC", "false")  # a second build would fail: it must not run
    assert few_rows.build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left behind


def test_a_failed_build_or_a_switch_leaves_the_library_kernels(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("OMNI2_CACHE", str(tmp_path))
    few_rows.kernel.cache_clear()
    try:
        monkeypatch.setenv("OMNI2_FEW_ROWS", "0")
        assert few_rows.kernel() is None
        few_rows.kernel.cache_clear()
        monkeypatch.delenv("OMNI2_FEW_ROWS")
        monkeypatch.setenv("CC", "false")  # a compiler that fails
        with caplog.at_level(logging.WARNING, logger="omni2.few_rows"):
            assert few_rows.kernel() is None
        assert "few-rows fp32 kernel not used" in caplog.text
        assert not list((tmp_path / "kernels").glob("*"))  # no half-built library left behind
        lm = torch.nn.Linear(8, 4)  # prepacking still works, on the library kernels only
        lin = prepack.PackedLinear(lm.weight, lm.bias, prepack.FP32_PLAIN_ROWS, few_rows.kernel())
        assert lin.few_packed is None
        x = torch.randn(5, 8)
        torch.testing.assert_close(lin(x), lm(x).detach())
    finally:
        few_rows.kernel.cache_clear()


@needs_kernel
def test_packed_linear_uses_few_rows_for_decode_steps_then_onednn(kernel):
    torch.manual_seed(0)
    w, b = torch.randn(300, 96), torch.randn(300)
    lin = prepack.PackedLinear(w, b, prepack.FP32_PLAIN_ROWS, kernel)
    assert lin.weight is None  # no plain copy kept beside the kernel's
    packed = kernel.pack(w)
    for rows in (1, 2, 3, 16, prepack.FEW_ROWS_MAX):  # one session's 2 rows included
        x = torch.randn(rows, 96)
        assert torch.equal(lin(x), kernel.linear(x, packed, 300, b))
    x = torch.randn(prepack.FEW_ROWS_MAX + 1, 96)  # prompt chunks: oneDNN
    y = torch.ops.mkldnn._linear_pointwise(x, lin.packed, b, "none", [], "")
    assert torch.equal(lin(x), y)
    plain = prepack.PackedLinear(w, b, prepack.FP32_PLAIN_ROWS, None)  # no kernel: MKL for one session
    x = torch.randn(2, 96)
    assert torch.equal(plain(x), F.linear(x, w, b))


@needs_kernel
@pytest.mark.parametrize("rows,n,k", [(1, 100, 200), (8, 47, 896), (11, 300, 129)])
def test_int8_weights_are_widened_exactly_and_scaled_per_output(kernel, rows, n, k):
    g = torch.Generator().manual_seed(n)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scales = torch.rand(n, generator=g) + 0.01
    x = torch.randn(rows, k, generator=g)
    got = kernel.int8_linear(x, kernel.pack(q), n, scales)
    exact, bound = reference(x, q.float(), None)
    exact, bound = exact * scales.double(), (bound + 2.0 ** -24 * exact.abs()) * scales.double()
    assert bool(((got.double() - exact).abs() <= bound).all())
    with pytest.raises(ValueError, match="fp32 scales"):
        kernel.int8_linear(x, kernel.pack(q), n, scales[:-1])
    with pytest.raises(ValueError, match="pack 2-D fp32, bf16 or int8"):
        kernel.pack(q.to(torch.int16))


@needs_kernel
@pytest.mark.parametrize("rows,n,k", [(1, 48, 16), (2, 100, 200), (9, 47, 129), (16, 300, 896)])
def test_bf16_weights_give_bitwise_the_fp32_kernels_result_for_the_widened_weights(kernel, rows, n, k):
    g = torch.Generator().manual_seed(rows + n)
    w = torch.randn(n, k, generator=g).bfloat16()
    x, b = torch.randn(rows, k, generator=g), torch.randn(n, generator=g)
    got = kernel.linear(x, kernel.pack(w), n, b)
    assert torch.equal(got, kernel.linear(x, kernel.pack(w.float()), n, b))
    assert kernel.pack(w).dtype == torch.bfloat16  # half the bytes streamed


@needs_kernel
def test_bf16_packed_linear_uses_few_rows_for_two_sessions_then_onednn(kernel):
    torch.manual_seed(1)
    w, b = torch.randn(300, 96).bfloat16(), torch.randn(300).bfloat16()
    lin = prepack.PackedLinear(w, b, 0, kernel)
    for rows in range(1, prepack.BF16_FEW_ROWS_MAX + 1):  # fp32 sums, rounded to bf16 once
        x = torch.randn(rows, 96).bfloat16()
        y = lin(x)
        assert y.dtype == torch.bfloat16
        assert torch.equal(y, kernel.linear(x.float(), kernel.pack(w), 300, b.float()).bfloat16())
        torch.testing.assert_close(y, F.linear(x, w, b))  # oneDNN/MKL's answer to bf16 rounding
    x = torch.randn(prepack.BF16_FEW_ROWS_MAX + 1, 96).bfloat16()  # AMX territory: oneDNN
    assert torch.equal(lin(x), torch.ops.mkldnn._linear_pointwise(x, lin.packed, b, "none", [], ""))


@needs_kernel
@needs("vnni")
@pytest.mark.parametrize("rows,n,k", [(1, 48, 16), (3, 100, 201), (9, 47, 130), (8, 300, 896)])
def test_int8_rows_by_int8_weights_sum_exactly(kernel, rows, n, k):
    """quantize_rows then u8s8_linear: integer sums exact (k not a multiple of 4 padded with
    zeros), then scaled by the row's and the output's scales, in that order."""
    g = torch.Generator().manual_seed(rows * 100 + k)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    x = torch.randn(rows, k, generator=g) * torch.logspace(-2, 2, rows)[:, None]
    packed = kernel.pack_u8s8(q)
    xq, scale, err, qnorm = kernel.quantize_rows(x, 4 * packed.size(1))
    qx = xq[:, :k].long() - 128
    assert bool((xq[:, k:] == 128).all()) and int(qx.abs().max()) == 127
    torch.testing.assert_close(scale, x.abs().amax(1) / 127)
    exact_err = (x.double() - scale.double()[:, None] * qx.double()).norm(dim=1)
    torch.testing.assert_close(err, exact_err)
    torch.testing.assert_close(qnorm, qx.double().norm(dim=1))
    col_scale = torch.rand(n, generator=g) + 0.5
    got = kernel.u8s8_linear(xq, scale, packed, n, q.int().sum(1, dtype=torch.int32), col_scale)
    assert torch.equal(got, (qx @ q.long().t()).float() * scale[:, None] * col_scale)
    with pytest.raises(ValueError, match="do not fit"):
        kernel.u8s8_linear(xq[:, 1:], scale, packed, n, q.int().sum(1, dtype=torch.int32), col_scale)


@needs_kernel
def test_a_non_finite_row_gets_a_nan_scale_and_int8_products_need_vnni(kernel):
    x = torch.ones(3, 8)
    x[1, 2], x[2, 5] = float("nan"), float("inf")
    _, scale, _, _ = kernel.quantize_rows(x, 8)
    assert scale[0] == 1 / 127 and scale[1:].isnan().all()
    off = copy.copy(kernel)
    off.vnni = False
    with pytest.raises(RuntimeError, match="VNNI"):
        off.u8s8_linear(torch.zeros(1, 8, dtype=torch.uint8), torch.ones(1), off.pack_u8s8(torch.zeros(4, 8, dtype=torch.int8)),
                        4, torch.zeros(4, dtype=torch.int32), torch.ones(4))


def test_every_c_kernel_ships_with_the_package_and_a_missing_one_is_a_clean_fallback(tmp_path):
    """pyproject's package data lists each C file under streaming/ (a wheel install needs them);
    a C file missing all the same makes the kernel unavailable, not an error."""
    import tomllib
    from pathlib import Path

    from omni2.streaming.cpu import native

    root = Path(__file__).resolve().parents[1]
    with open(root / "pyproject.toml", "rb") as f:
        data = tomllib.load(f)["tool"]["setuptools"]["package-data"]
    shipped = {f"streaming/{package.removeprefix('omni2.streaming').strip('.').replace('.', '/')}/{name}".replace("//", "/")
               for package, names in data.items() if package.startswith("omni2.streaming") for name in names}
    c_files = {p.relative_to(root).as_posix() for p in (root / "streaming").rglob("*.c")}
    assert c_files and shipped == c_files
    with pytest.raises(native.Unavailable, match="not installed"):
        native.build(tmp_path / "gone.c", tmp_path, native.BASE_CFLAGS)
