"""The fused CPU kernel is the reference layer: the same winners for the same noise, the same gradients, the
same sampling distribution, a noise source that behaves like its distribution, and less saved state."""
import math
import shutil

import pytest
import torch

from lwta_vision.layers import LWTA, fused, lwta

needs_kernel = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                  reason="no C++ compiler: the fused kernel cannot be built here")

CASES = [  # shape, dim, U, channels-last
    ((6, 12, 5, 7), 1, 2, False),
    ((6, 12, 5, 7), 1, 4, False),
    ((6, 12, 5, 7), 1, 4, True),
    ((6, 12, 5, 7), 1, 2, True),
    ((4, 48, 3, 3), 1, 16, False),
    ((4, 9, 48), -1, 24, False),
    ((4, 9, 48), -1, 2, False),
]


@needs_kernel
def test_kernel_builds_on_a_machine_with_a_compiler():
    assert fused.extension() is not None, fused.unavailable_reason()


def _pair(shape, dtype, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randn(shape, generator=g).to(dtype)


@needs_kernel
@pytest.mark.parametrize("shape,dim,u,channels_last", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("noise_scale,temperature", [(0.1, 1.67), (1.0, 0.5)])
def test_same_noise_same_output_and_gradients_as_the_reference(shape, dim, u, channels_last, dtype, noise_scale,
                                                               temperature):
    x, w = _pair(shape, dtype, channels_last)
    seed = fused.draw_seed(torch.Generator().manual_seed(3))
    a = x.clone().requires_grad_()
    y = fused.lwta_fused(a, u, dim, temperature, noise_scale, seed=seed)
    b = x.clone().requires_grad_()
    ref = lwta(b, u, dim=dim, temperature=temperature, noise_scale=noise_scale, impl="reference",
               noise=fused.noise_for(x, u, dim, seed))
    assert y.dtype == dtype and y.stride() == x.stride()
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(y.view(bits), ref.view(bits))  # bit for bit: the winners' values, the losers' signed zeros
    (y.float() * w.float()).sum().backward()
    (ref.float() * w.float()).sum().backward()
    assert a.grad.dtype == dtype and a.grad.shape == x.shape
    scale = b.grad.float().abs().max().item()
    tol = 1e-5 if dtype == torch.float32 else (2 ** -7 if dtype == torch.bfloat16 else 2 ** -10)
    assert (a.grad.float() - b.grad.float()).abs().max().item() <= 2 * tol * max(scale, 1.0)
    losers = y.detach() == 0
    assert (a.grad[losers] != 0).float().mean() > 0.9  # the relaxation reaches losing units


@needs_kernel
@pytest.mark.parametrize("u", [2, 4, 16])
@pytest.mark.parametrize("noise_scale", [0.5, 2.0])
def test_win_frequencies_are_the_block_softmax_along_a_row_and_across_rows(u, noise_scale):
    # the noise is keyed by (row, position): check positions of one row (a conv map) and many rows (vectors)
    logits = torch.linspace(1.0, -1.0, u) + 0.1 * torch.arange(u).sin()
    expected = torch.softmax(logits / noise_scale, 0)
    along_row = logits.view(1, u, 1, 1).expand(1, u, 200, 200).contiguous()
    across_rows = logits.repeat(40000, 1)
    for x, dim in ((along_row, 1), (across_rows, -1)):
        for seed in (0, 1):
            y = lwta(x, u, dim=dim, noise_scale=noise_scale, impl="fused",
                     generator=torch.Generator().manual_seed(seed))
            freq = (y != 0).float().transpose(0, dim % x.ndim).reshape(u, -1).mean(1)
            assert torch.allclose(freq, expected, atol=0.012), (dim, seed, freq, expected)


@needs_kernel
def test_noise_has_its_distribution_and_no_correlation_between_neighbours():
    x = torch.zeros(64, 32, 32, 32)
    seed = fused.draw_seed(torch.Generator().manual_seed(5))
    g = fused.noise_for(x, 4, 1, seed).flatten().double()  # Gumbel(0, 1), 2M draws
    assert abs(g.mean().item() - 0.5772156649) < 0.005 and abs(g.var().item() - math.pi ** 2 / 6) < 0.01
    qs = torch.tensor([0.001, 0.01, 0.1, 0.5, 0.9, 0.99, 0.999], dtype=torch.float64)
    emp = torch.quantile(g[:1_000_000], qs)
    assert torch.allclose(torch.exp(-torch.exp(-emp)), qs, atol=2e-3)  # the Gumbel CDF at the quantiles
    grid = g.reshape(64, 8, 4, 32, 32)
    for a, b in ((grid[..., 1:], grid[..., :-1]), (grid[:, :, 1:], grid[:, :, :-1]), (grid[:, 1:], grid[:, :-1]),
                 (grid[1:], grid[:-1])):
        assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()) < 0.005
    pair = fused.noise_for(x, 2, 1, seed).flatten().double()  # Logistic(0, 1) per block
    assert abs(pair.mean().item()) < 0.01 and abs(pair.var().item() - math.pi ** 2 / 3) < 0.03


@needs_kernel
def test_noise_is_finite_and_bounded_at_both_ends():
    # the uniform's extreme values map to the largest and smallest noise: 2^26 draws reach them (a draw of
    # exactly 0 or 1 would give an infinite or absurd value in about one of 2^24)
    x = torch.zeros(4, 4, 2048, 2048)
    for u, lo, hi in ((4, -2.82, 16.64), (2, -16.64, 16.64)):
        g = fused.noise_for(x, u, 1, fused.draw_seed(torch.Generator().manual_seed(11)))
        assert torch.isfinite(g).all()
        assert lo <= g.min().item() < lo + 0.5 and hi - 1.5 < g.max().item() <= hi, (u, g.min(), g.max())


@needs_kernel
def test_seeds_reproduce_and_differ():
    x = torch.randn(8, 16, 6, 6)
    torch.manual_seed(0)
    a = lwta(x, 4, dim=1)
    torch.manual_seed(0)
    assert torch.equal(a, lwta(x, 4, dim=1))
    assert not torch.equal(a, lwta(x, 4, dim=1))  # the next call draws a new seed


def _saved_bytes(fn, x):
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x.clone().requires_grad_())
    return sum(seen.values())


@needs_kernel
@pytest.mark.parametrize("u", [2, 16])
def test_only_the_input_and_the_seed_are_kept_for_backward(u):
    x = torch.randn(8, 32, 16, 16)
    kept = _saved_bytes(lambda t: lwta(t, u, dim=1, impl="fused"), x)
    assert kept == x.numel() * 4 + 8
    assert _saved_bytes(lambda t: lwta(t, u, dim=1, impl="reference"), x) > 1.4 * kept


@needs_kernel
def test_where_the_kernel_does_not_apply_the_reference_runs():
    x = torch.randn(6, 8, 12)
    t = x.transpose(1, 2)  # neither contiguous nor channels-last
    assert fused.layout(t, 4, -1) is None and fused.layout(x.double(), 4, -1) is None
    y = lwta(t, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(y, lwta(t, 4, impl="reference", generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="impl='fused' cannot run here.*float64"):
        lwta(x.double(), 4, impl="fused")
    with pytest.raises(ValueError, match="impl must be one of"):
        LWTA(4, impl="triton")


@needs_kernel
def test_env_switch_turns_the_fused_path_off(monkeypatch):
    x = torch.randn(16, 24)
    monkeypatch.setenv("LWTA_VISION_FUSED", "0")
    a = lwta(x, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, lwta(x, 4, impl="reference", generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="LWTA_VISION_FUSED=0"):
        lwta(x, 4, impl="fused")


def test_a_failed_build_warns_once_and_the_reference_runs(monkeypatch):
    def fail():
        raise RuntimeError("Error building extension 'lwta_vision_fused': c++: not found")

    monkeypatch.setattr(fused, "_ext", None)
    monkeypatch.setattr(fused, "_error", None)
    monkeypatch.setattr(fused, "_build", fail)
    x = torch.randn(16, 24)
    with pytest.warns(RuntimeWarning, match="could not be built.*c\\+\\+: not found.*LWTA_VISION_FUSED=0"):
        y = lwta(x, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(y, lwta(x, 4, impl="reference", generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="cannot run here: RuntimeError"):
        lwta(x, 4, impl="fused")


@needs_kernel
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_graph_keeps_the_op_and_draws_a_new_sample_each_call(backend):
    fused.extension()  # built before tracing, as LitClassifier(compile=True) does
    torch._dynamo.reset()
    layer = LWTA(4, dim=1)
    compiled = torch.compile(layer, backend=backend, fullgraph=True)  # fullgraph: no graph break
    x = torch.randn(4, 16, 5, 5, requires_grad=True)
    a, b = compiled(x), compiled(x)
    assert not torch.equal(a, b)
    for y in (a, b):
        assert torch.all((y.reshape(4, 4, 4, 5, 5) != 0).sum(2) == 1)
    (a * torch.randn_like(a)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
