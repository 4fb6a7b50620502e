import math

import pytest
import torch
from torch import nn

from massrl.config import OptimizerConfig
from massrl.optim import (
    build_optimizer,
    cosine_tau,
    scaled_lr,
    split_decay_groups,
    warmup_cosine,
    warmup_note,
)


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def test_biases_and_norms_are_excluded_from_decay_and_lars():
    net = _net()
    opt = build_optimizer(OptimizerConfig(name="lars", weight_decay=0.1), net.named_parameters(),
                          lr=0.5)
    weights, others = opt.param_groups
    assert {id(p) for p in weights["params"]} == {id(net[0].weight), id(net[3].weight)}
    assert weights["weight_decay"] == 0.1 and weights["always_adapt"]
    assert others["weight_decay"] == 0.0 and not others["always_adapt"]
    assert len(others["params"]) == 4  # two biases, BN weight and bias


def test_lars_leaves_excluded_params_as_plain_sgd_and_adapts_weights():
    torch.manual_seed(0)
    net = _net()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = build_optimizer(OptimizerConfig(name="lars", weight_decay=0.0, momentum=0.0,
                                          trust_coefficient=0.001), net.named_parameters(), lr=1.0)
    net(torch.randn(16, 4)).sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    opt.step()
    bias_step = before["0.bias"] - net[0].bias.detach()
    assert torch.allclose(bias_step, grads["0.bias"], atol=1e-6)  # lr 1, no trust ratio
    w_step = (before["0.weight"] - net[0].weight.detach()).norm()
    expected = 0.001 * before["0.weight"].norm()  # trust ratio scales the step to ||w||*eta
    assert math.isclose(w_step.item(), expected.item(), rel_tol=1e-3)


def test_trust_clip_caps_a_layer_step_at_the_lr():
    """optimizer.trust_clip (solo-learn's clip_lr): a layer whose trust ratio exceeds the lr
    steps at the lr, as plain SGD would."""
    torch.manual_seed(0)
    steps = {}
    for clip in (False, True):
        net = _net().double()  # (steps far below the weights: float64 keeps them exact)
        before = net[0].weight.detach().clone()
        opt = build_optimizer(OptimizerConfig(name="lars", weight_decay=0.0, momentum=0.0,
                                              trust_coefficient=0.02, trust_clip=clip),
                              net.named_parameters(), lr=0.1)
        # small gradients: ||w||/||g|| large, the trust ratio far above the lr
        (net(torch.randn(16, 4, dtype=torch.float64)).sum() * 1e-4).backward()
        grad = net[0].weight.grad.clone()
        opt.step()
        steps[clip] = (before - net[0].weight.detach(), grad)
    step, grad = steps[True]
    assert torch.allclose(step, 0.1 * grad, rtol=1e-6, atol=1e-12)  # capped: lr x gradient
    assert steps[False][0].norm() > 10 * step.norm()  # unclipped: far larger


def test_exclusion_can_be_turned_off():
    groups = split_decay_groups(_net().named_parameters(), 0.1, exclude_bias_norm=False)
    assert len(groups) == 1 and len(groups[0]["params"]) == 6


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_other_optimizers(name, cls):
    opt = build_optimizer(OptimizerConfig(name=name), _net().named_parameters(), lr=0.1)
    assert isinstance(opt, cls)
    assert "always_adapt" not in opt.param_groups[0]


def test_lr_scales_with_global_batch():
    assert scaled_lr(OptimizerConfig(lr=0.3), 2048) == pytest.approx(2.4)
    assert scaled_lr(OptimizerConfig(lr=0.3, scale_lr=False), 2048) == 0.3
    # SimCLR's square-root rule: 0.075 x sqrt(batch) is lr 1.2 at 256
    assert scaled_lr(OptimizerConfig(lr=1.2, scale_lr="sqrt"), 1024) == pytest.approx(2.4)
    assert scaled_lr(OptimizerConfig(lr=1.2, scale_lr="sqrt"), 4096) == \
        pytest.approx(0.075 * 4096 ** 0.5)


def test_warmup_then_cosine():
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100) == pytest.approx(0.5)
    assert warmup_cosine(100, 10, 100) == pytest.approx(0.0)
    assert warmup_cosine(100, 10, 100, min_ratio=0.1) == pytest.approx(0.1)


def test_tau_schedule_end_points_and_monotone():
    assert cosine_tau(0, 1000, 0.99) == pytest.approx(0.99)
    assert cosine_tau(1000, 1000, 0.99) == pytest.approx(1.0)
    assert cosine_tau(500, 1000, 0.99) == pytest.approx(0.995)
    taus = [cosine_tau(s, 1000, 0.996, 1.0) for s in range(0, 1001, 50)]
    assert all(a <= b for a, b in zip(taus, taus[1:], strict=False))


def test_a_warm_up_as_long_as_the_run_gets_a_note():
    note = warmup_note(10, 4)
    assert "warmup_epochs=10" in note and "max_epochs=4" in note and "40%" in note
    assert "e.g. optimizer.warmup_epochs=0.4" in note
    assert "e.g. optimizer.warmup_epochs=0.1" in warmup_note(10, 1)  # (1 would get the note)
    assert warmup_note(10, 10) is not None
    assert warmup_note(0.5, 4) is None and warmup_note(0, 1) is None


def test_sgd_and_adamw_take_the_configs_momentum_and_decay_groups():
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    sgd = build_optimizer(OptimizerConfig(name="sgd", momentum=0.7, weight_decay=0.3),
                          net.named_parameters(), lr=0.1)
    assert [g["momentum"] for g in sgd.param_groups] == [0.7, 0.7]
    adamw = build_optimizer(OptimizerConfig(name="adamw", weight_decay=0.3),
                            net.named_parameters(), lr=0.1)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.3, 0.0]


def test_min_lr_ratio_leaves_the_peak_and_the_midpoint_in_place():
    assert warmup_cosine(10, 10, 100, min_ratio=0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100, min_ratio=0.1) == pytest.approx(0.55)
