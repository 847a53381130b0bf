"""Section 5's update rule against the formula, and the learning-rate schedules."""

import pytest
import torch

from alexcli.errors import UsageError
from alexcli.train.optim import PaperSGD, Schedule, set_lr


def test_update_rule_equals_the_formula_across_an_lr_change():
    torch.manual_seed(0)
    w = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    opt = PaperSGD([w], lr=0.01)
    w_ref, v_ref = w.detach().clone(), torch.zeros(7, 3, dtype=torch.float64)
    for step, lr in enumerate([0.01, 0.01, 0.01, 0.001, 0.001, 0.0001]):
        set_lr(opt, lr)
        grad = torch.randn(7, 3, dtype=torch.float64)
        w.grad = grad.clone()
        opt.step()
        v_ref = 0.9 * v_ref - 0.0005 * lr * w_ref - lr * grad  # v <- 0.9v - 0.0005*lr*w - lr*grad
        w_ref = w_ref + v_ref                                    # w <- w + v
        torch.testing.assert_close(w.detach(), w_ref, rtol=1e-14, atol=1e-14, msg=f"step {step}")
        torch.testing.assert_close(opt.state[w]["velocity"], v_ref, rtol=1e-14, atol=1e-14)


def test_differs_from_torch_sgd_once_lr_changes():
    """torch.optim.SGD scales the remembered velocity by the new lr (docs/design.md)."""
    torch.manual_seed(0)
    a = torch.randn(5, dtype=torch.float64, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    ours, theirs = PaperSGD([a], lr=0.1), torch.optim.SGD([b], lr=0.1, momentum=0.9, weight_decay=5e-4)
    grads = [torch.randn(5, dtype=torch.float64) for _ in range(4)]
    for i, g in enumerate(grads):
        if i == 2:
            set_lr(ours, 0.01), set_lr(theirs, 0.01)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step(), theirs.step()
        if i < 2:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(a, b, rtol=1e-6, atol=1e-9)


def test_plateau_divides_by_ten_at_most_three_times():
    s = Schedule("plateau", base_lr=0.01, patience=2)
    errors = [0.9, 0.8, 0.8, 0.8] + [0.8] * 20
    lrs = []
    for epoch, e in enumerate(errors, 1):
        s.end_epoch(epoch, e)
        lrs.append(s.lr)
    assert lrs[:4] == [0.01, 0.01, 0.01, pytest.approx(0.001)]
    assert s.drops == 3 and lrs[-1] == pytest.approx(1e-5)


def test_plateau_state_round_trip():
    s = Schedule("plateau", patience=2)
    s.end_epoch(1, 0.5), s.end_epoch(2, 0.6)
    t = Schedule("plateau", patience=2)
    t.load_state_dict(s.state_dict())
    assert t.end_epoch(3, 0.6) and s.end_epoch(3, 0.6) and t.lr == s.lr


def test_steps_schedule():
    s = Schedule("steps", base_lr=0.1, steps=(2, 4))
    lrs = []
    for epoch in range(1, 6):
        s.end_epoch(epoch, None)
        lrs.append(s.lr)
    assert lrs == pytest.approx([0.1, 0.01, 0.01, 0.001, 0.001])


def test_bad_schedule_options():
    with pytest.raises(UsageError, match="--lr-steps"):
        Schedule("steps")
    with pytest.raises(UsageError, match=r"^--schedule must be one of plateau, steps, constant, cosine, not 'linear'$"):
        Schedule("linear")
    with pytest.raises(UsageError, match=r"^--warmup 5 leaves no epoch of the 5 after it; use fewer$"):
        Schedule("cosine", warmup=5, epochs=5)


def rates(s: Schedule, epochs: int, errors=None) -> list[float]:
    """The rate each epoch 1..EPOCHS trains at."""
    out = [s.lr]
    for epoch in range(1, epochs):
        s.end_epoch(epoch, errors[epoch - 1] if errors else None)
        out.append(s.lr)
    return out


def test_cosine_and_constant_with_warmup_follow_their_formulas():
    import math

    base, epochs, warmup = 0.02, 10, 2
    expected = [base * e / (warmup + 1) for e in (1, 2)] + [
        base * 0.5 * (1 + math.cos(math.pi * t / (epochs - warmup))) for t in range(epochs - warmup)]
    assert rates(Schedule("cosine", base, warmup=warmup, epochs=epochs), epochs) == pytest.approx(expected, abs=1e-15)
    assert rates(Schedule("constant", base, epochs=epochs), epochs) == [base] * epochs
    assert rates(Schedule("constant", base, warmup=3, epochs=epochs), 5) == pytest.approx(
        [0.005, 0.01, 0.015, 0.02, 0.02])


def test_steps_default_to_a_third_and_two_thirds_of_the_epochs():
    s = Schedule("steps", 0.01, epochs=90)
    assert s.steps == (30, 60)
    lrs = rates(s, 90)
    assert lrs[29] == 0.01 and lrs[30] == pytest.approx(0.001) and lrs[60] == pytest.approx(0.0001)


def test_plateau_does_not_count_warmup_epochs():
    errors = [0.9, 0.9, 0.9, 0.8, 0.8, 0.8]
    warm = rates(Schedule("plateau", 0.01, patience=2, warmup=3, epochs=10), 7, errors)
    assert warm[:4] == pytest.approx([0.0025, 0.005, 0.0075, 0.01])  # the flat warm-up epochs are not a plateau
    assert warm[4:] == pytest.approx([0.01, 0.01, 0.001])


def test_warmup_and_cosine_state_round_trip():
    s = Schedule("cosine", 0.01, warmup=2, epochs=8)
    for epoch in (1, 2, 3):
        s.end_epoch(epoch, None)
    t = Schedule("cosine", 0.01, warmup=2, epochs=8)
    t.load_state_dict(s.state_dict())
    assert t.lr == s.lr
    for epoch in (4, 5, 6):
        s.end_epoch(epoch, None), t.end_epoch(epoch, None)
        assert t.lr == s.lr


def test_param_groups_follow_the_network_and_train_and_experiment_use_them(train_data, tmp_path, monkeypatch):
    """The CIFAR net leaves its conv layers undecayed (cuda-convnet's wc=0); `alexcli train --arch
    cifar-local` decayed them (only the experiment honoured it). AlexNet decays everything."""
    from alexcli.model.registry import build_model, make_arch
    from alexcli.train import loop
    from alexcli.train.launch import train
    from alexcli.train.config import TrainConfig
    from alexcli.train.optim import param_groups

    net, _ = build_model(make_arch("cifar-local", width=0.25))
    groups = param_groups(net, 0.004)
    names = {id(p): n for n, p in net.named_parameters()}
    assert [g["weight_decay"] for g in groups] == [0.004, 0.0]
    assert sorted(names[id(p)] for p in groups[1]["params"]) == ["conv1.bias", "conv1.weight", "conv2.bias",
                                                                 "conv2.weight"]
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(net.parameters()))
    alex, _ = build_model(make_arch("alexnet", width=0.125, crop=64))
    (only,) = param_groups(alex, 0.0005)
    assert only["weight_decay"] == 0.0005 and len(only["params"]) == len(list(alex.parameters()))

    made = []

    class Recording(loop.PaperSGD):
        def __init__(self, params, **kw):
            super().__init__(params, **kw)
            made.append(self)

    monkeypatch.setattr(loop, "PaperSGD", Recording)
    cfg = TrainConfig(data=str(train_data), out=str(tmp_path / "run"), epochs=1, batch=8, loader_workers=0,
                      schedule="steps", lr_steps=(2,), steps_per_epoch=1, weight_decay=0.004, device="cpu")
    train(cfg, make_arch("cifar-local", width=0.25, crop=64))
    (opt,) = made
    assert [g["weight_decay"] for g in opt.param_groups] == [0.004, 0.0]
    assert len(opt.param_groups[1]["params"]) == 4
