import math

import pytest
import torch
from torch import nn

from lwta_vision.layers import LWTA, collect_lwta_stats, create_act, lwta, lwta_kl_uniform


def _blocks(x, u, dim):
    dim = dim % x.ndim
    return x.reshape(x.shape[:dim] + (x.shape[dim] // u, u) + x.shape[dim + 1:]), dim + 1


@pytest.mark.parametrize(
    "shape,dim", [((8, 12), -1), ((4, 5, 24), -1), ((3, 16, 5, 7), 1)]
)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("u", [2, 4])
def test_one_winner_per_block_that_keeps_its_value(shape, dim, training, u):
    x = torch.randn(shape)
    y = lwta(x, u, dim=dim, temperature=0.67, training=training)
    assert y.shape == x.shape
    yb, axis = _blocks(y, u, dim)
    winners = (yb != 0).sum(axis)
    assert torch.all(winners == 1)
    nz = y != 0
    assert torch.equal(y[nz], x[nz])  # the winner passes its own value, negative or not
    assert math.isclose((nz.float().mean()).item(), 1 / u, rel_tol=1e-6)


def test_winner_can_be_negative():
    x = torch.tensor([[-3.0, -1.0, -2.0, -5.0]])
    assert torch.equal(lwta(x, 4, training=False), torch.tensor([[0.0, -1.0, 0.0, 0.0]]))


def test_conv_competes_across_channels_per_position():
    x = torch.randn(2, 6, 4, 4)
    y = lwta(x, 3, dim=1, training=False)
    # every spatial position has exactly one winner per channel block
    assert torch.all((y.reshape(2, 2, 3, 4, 4) != 0).sum(2) == 1)
    ref = x.reshape(2, 2, 3, 4, 4)
    expected = ref * torch.nn.functional.one_hot(ref.argmax(2), 3).permute(0, 1, 4, 2, 3)
    assert torch.equal(y, expected.reshape_as(x))


def test_argmax_eval_is_deterministic_and_sample_is_not():
    x = torch.randn(64, 32)
    m = LWTA(competitors=4, eval_mode="argmax").eval()
    assert torch.equal(m(x), m(x))
    s = LWTA(competitors=4, eval_mode="sample").eval()
    torch.manual_seed(1)
    a = s(x)
    torch.manual_seed(2)
    assert not torch.equal(a, s(x))


def test_sample_mode_win_frequencies_match_block_softmax():
    torch.manual_seed(0)
    logits = torch.tensor([1.0, 0.2, -1.0, 0.5])  # no exact 0: a winner of value 0 looks like a loser
    n = 40000
    x = logits.repeat(n, 1)
    for training, mode in ((False, "sample"), (True, "argmax")):
        g = torch.Generator().manual_seed(123)
        y = lwta(x, 4, training=training, eval_mode=mode, temperature=3.0, generator=g, noise_scale=1.0)
        freq = (y != 0).float().mean(0)
        expected = torch.softmax(logits, 0)
        # 4 sigma of a binomial proportion at n=40000 is < 0.01; temperature must not change the frequencies
        assert torch.allclose(freq, expected, atol=0.01), (freq, expected)


def test_temperature_does_not_change_hard_winner():
    x = torch.randn(16, 8)
    a = lwta(x, 4, temperature=0.1, generator=torch.Generator().manual_seed(5))
    b = lwta(x, 4, temperature=10.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a != 0, b != 0)


def test_gradients_reach_winners_and_relaxation():
    x = torch.randn(32, 8, requires_grad=True)
    g = torch.Generator().manual_seed(0)
    y = lwta(x, 4, temperature=1.0, generator=g)
    (y * torch.randn_like(y)).sum().backward()
    grad = x.grad
    winners = y != 0
    assert torch.all(grad[winners] != 0)
    # losers get gradient only through the relaxation: non-zero, and different from the straight path
    assert (grad[~winners] != 0).float().mean() > 0.9


def test_straight_through_gradient_matches_autograd_reference():
    torch.manual_seed(3)
    x = torch.randn(3, 8, 2, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 8, 2, 2, dtype=torch.float64)
    y = lwta(x, 4, dim=1, temperature=0.7, generator=torch.Generator().manual_seed(9), noise_scale=0.3)
    (y * w).sum().backward()
    ours = x.grad.clone()
    x.grad = None
    # reference: the textbook expression, same noise
    gen = torch.Generator().manual_seed(9)
    b, ax = _blocks(x, 4, 1)
    u = torch.rand(b.shape, dtype=torch.float32, generator=gen).double()
    z = (b - 0.3 * (-u.log()).log()) / 0.7
    soft = torch.softmax(z, ax)
    hard = torch.zeros_like(z).scatter_(ax, z.argmax(ax, keepdim=True), 1.0)
    ((b * (hard - soft.detach() + soft)).reshape_as(x) * w).sum().backward()
    assert torch.allclose(ours, x.grad, atol=1e-12)


def test_soft_mode_is_dense_and_differentiable():
    x = torch.randn(8, 8, requires_grad=True)
    y = lwta(x, 4, hard=False)
    assert (y != 0).float().mean() > 0.9
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_errors_name_the_numbers():
    with pytest.raises(ValueError, match=r"width 10 .*competitors=4"):
        lwta(torch.randn(2, 10), 4)
    with pytest.raises(ValueError, match="eval_mode"):
        LWTA(2, eval_mode="mean")
    with pytest.raises(ValueError, match="temperature"):
        LWTA(2, temperature=0)
    with pytest.raises(ValueError, match="unknown activation"):
        create_act("swishy")
    with pytest.raises(ValueError, match="competitors"):
        create_act("relu", competitors=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_extreme_inputs_never_nan(dtype):
    x = torch.tensor([[6e4, -6e4, 0.0, 1e-8], [-1e4, -1e4, -1e4, -1e4]]).to(dtype).repeat(256, 1)
    for training in (True, False):
        y = lwta(x, 4, training=training, eval_mode="sample")
        assert y.dtype == dtype
        assert not torch.isnan(y).any()


def test_kl_uniform_zero_for_uniform_and_positive_otherwise():
    assert lwta_kl_uniform(torch.zeros(4, 8), 4).abs() < 1e-7
    x = torch.tensor([[10.0, 0.0]])
    expected = (torch.softmax(x, -1) * (torch.log_softmax(x, -1) + math.log(2))).sum()
    assert torch.allclose(lwta_kl_uniform(x, 2), expected)


def test_stats_hooks_are_scoped_and_measure_sparsity():
    model = nn.Sequential(nn.Linear(8, 16), LWTA(4), nn.Linear(16, 12), LWTA(3))
    x = torch.randn(64, 8)
    with collect_lwta_stats(model, win_rates=True, kl=True) as stats:
        model(x)
    assert stats.sparsity == pytest.approx({"1": 0.25, "3": 1 / 3})
    rates = stats.win_rates["1"]
    assert rates.shape == (16,)
    assert torch.allclose(rates.reshape(4, 4).sum(1), torch.ones(4, dtype=rates.dtype))
    assert stats.kl_total() is not None and stats.kl_total().requires_grad
    assert all(not m._forward_hooks for m in model.modules())


def test_pair_fast_path_gradient_matches_gumbel_softmax_reference():
    from lwta_vision.layers.lwta import _logistic_like

    x = torch.randn(5, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn_like(x)
    y = lwta(x, 2, dim=1, temperature=0.5, generator=torch.Generator().manual_seed(4), noise_scale=0.3)
    (y * w).sum().backward()
    ours = x.grad.clone()
    x.grad = None
    b, ax = _blocks(x, 2, 1)
    noise = _logistic_like(b.select(ax, 0), torch.Generator().manual_seed(4))
    # a Logistic on unit 0 is a difference of two Gumbels: the same relaxed sample as Gumbel-softmax
    z = torch.stack([b.select(ax, 0) + 0.3 * noise, b.select(ax, 1)], dim=ax) / 0.5
    soft = torch.softmax(z, ax)
    hard = torch.zeros_like(z).scatter_(ax, z.argmax(ax, keepdim=True), 1.0)
    ref = (b * (hard - soft.detach() + soft)).reshape_as(x)
    assert torch.equal(y.detach(), ref.detach())
    (ref * w).sum().backward()
    assert torch.allclose(ours, x.grad, atol=1e-12)


def test_pair_fast_path_win_frequency_is_sigmoid_of_difference():
    x = torch.tensor([0.7, -0.4]).repeat(40000, 1)
    y = lwta(x, 2, temperature=1.67, generator=torch.Generator().manual_seed(0), noise_scale=1.0)
    assert abs((y[:, 0] != 0).float().mean().item() - torch.sigmoid(torch.tensor(1.1)).item()) < 0.01


def test_argmax_ties_still_give_one_winner():
    y = lwta(torch.ones(2, 8), 4, training=False)
    assert torch.equal((y != 0).float(), torch.tensor([[1.0, 0, 0, 0, 1, 0, 0, 0]] * 2))


@pytest.mark.parametrize("u", [2, 4])  # U=2 takes the Logistic fast path, U=4 the Gumbel one
@pytest.mark.parametrize("training,mode", [(True, "argmax"), (False, "sample")])
def test_noise_scale_sets_the_sampling_distribution(u, training, mode):
    # winner = argmax(x + s * g): drawn from softmax(x / s), in training and in sampled inference alike
    logits = torch.tensor([1.0, 0.2, -1.0, 0.5])[:u]
    x = logits.repeat(40000, 1)
    for s in (0.5, 2.0):
        y = lwta(x, u, training=training, eval_mode=mode, noise_scale=s, generator=torch.Generator().manual_seed(7))
        freq = (y != 0).float().mean(0)
        expected = torch.softmax(logits / s, 0)
        assert torch.allclose(freq, expected, atol=0.01), (s, freq, expected)
        # and it is not the unscaled softmax: the test would catch a noise_scale that is ignored
        assert (freq - torch.softmax(logits, 0)).abs().max() > 0.05


def test_zero_noise_scale_is_the_deterministic_argmax_with_relaxed_gradients():
    x = torch.randn(64, 16, requires_grad=True)
    y = lwta(x, 4, noise_scale=0.0, temperature=1.0)
    assert torch.equal(y.detach(), lwta(x.detach(), 4, training=False))
    (y * torch.randn_like(y)).sum().backward()
    assert (x.grad[y.detach() == 0] != 0).float().mean() > 0.9  # losers still learn through softmax(x / tau)


def test_module_default_noise_scale_is_what_it_samples_with():
    m = LWTA(competitors=4).train()
    assert 0 < m.noise_scale < 1  # sharper than the classic Categorical(softmax(x)): see the LWTA docstring
    logits = torch.tensor([1.0, 0.2, -1.0, 0.5])
    torch.manual_seed(0)
    freq = (m(logits.repeat(40000, 1)) != 0).float().mean(0)
    assert torch.allclose(freq, torch.softmax(logits / m.noise_scale, 0), atol=0.01), freq
    with pytest.raises(ValueError, match="noise_scale"):
        LWTA(4, noise_scale=-0.1)


def test_old_configs_and_checkpoints_still_load():
    # noise_scale is a plain setting, not a parameter or buffer: a state dict from before it existed loads
    model = nn.Sequential(nn.Linear(8, 16), LWTA(4))
    assert set(model.state_dict()) == {"0.weight", "0.bias"}
    model.load_state_dict(nn.Sequential(nn.Linear(8, 16), nn.ReLU()).state_dict())


def test_win_entropy_is_zero_for_a_constant_winner_and_one_for_uniform():
    from lwta_vision.layers import win_entropy

    assert win_entropy(torch.tensor([50.0, 0, 0, 0, 0, 0, 7, 0]), 4) == 0.0  # each block: one unit wins all
    assert win_entropy(torch.tensor([5.0, 5, 5, 5, 1, 1, 1, 1]), 4) == pytest.approx(1.0)
    assert win_entropy(torch.tensor([1.0, 1, 0, 0]), 4) == pytest.approx(0.5)  # 2 of 4 share: log 2 / log 4
    assert win_entropy(torch.tensor([3.0, 1]), 2) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
                                                                  / math.log(2))


def test_stats_win_entropy_of_real_competition():
    layer = nn.Sequential(LWTA(4))
    with collect_lwta_stats(layer, win_rates=True) as stats:
        layer(torch.randn(4000, 16))  # i.i.d. inputs: every unit wins a quarter of the time
    assert stats.win_entropy({"0": 4})["0"] > 0.99
    biased = torch.randn(4000, 16) + torch.tensor([6.0, 0, 0, 0] * 4)  # unit 0 of each block nearly always wins
    with collect_lwta_stats(layer.eval(), win_rates=True) as stats:
        layer(biased)
    assert stats.win_entropy({"0": 4})["0"] < 0.1
