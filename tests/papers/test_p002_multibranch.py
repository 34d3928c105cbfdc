"""Paper 002, §3.2: the equal-loss options of the multi-branch measurements."""
import timm
import torch

import dcanets  # noqa: F401  (registers the models)
from dcanets.papers import p002_multibranch as bl


def test_train_to_loss_stops_at_the_target_and_counts_steps():
    x, y = bl.digits_data(64, 0)
    torch.manual_seed(0)
    m = timm.create_model("multibranch_mlp_1h", num_branches=4, total_width=16)
    loss, steps = bl.train_to_loss(m, x, y, target=0.5, max_steps=400)
    assert loss <= 0.5 and 0 < steps < 400
    fresh = []
    for _ in range(2):
        torch.manual_seed(0)
        fresh.append(timm.create_model("multibranch_mlp_1h", num_branches=4, total_width=16))
    assert bl.train_full_batch(fresh[0], x, y, steps) == loss  # `steps` is the number of Adam updates
    assert bl.train_full_batch(fresh[1], x, y, steps - 1) > 0.5  # one update fewer: not there yet


def test_measure_at_equal_loss_and_with_a_fixed_branch_width():
    reps = bl.measure([1, 4], depth=1, n=64, steps=2000, lines=1, lanczos_steps=5, target_loss=0.3,
                      branch_width=2)
    assert [r.total_width for r in reps] == [2, 8]  # identical branches, more of them
    assert all(r.reached and r.train_loss <= 0.3 and r.steps > 0 for r in reps)
    capped = bl.measure([1], total_width=8, n=64, steps=3, lines=1, lanczos_steps=5, target_loss=1e-6)
    assert not capped[0].reached and capped[0].steps == 3


def test_one_hidden_layer_at_fixed_total_width_is_one_net_with_a_scaled_head():
    # why the total-width split of a one-hidden-layer net cannot change its landscape: I branches
    # are the single dense net whose head is divided by I (and whose output bias is the mean)
    torch.manual_seed(0)
    multi = timm.create_model("multibranch_mlp_1h", num_branches=4, total_width=16, num_classes=3)
    single = timm.create_model("multibranch_mlp_1h", num_branches=1, total_width=16, num_classes=3)
    with torch.no_grad():
        single.hidden[0].weight.copy_(multi.hidden[0].weight.permute(1, 0, 2).reshape(1, 64, 16))
        single.hidden[0].bias.copy_(multi.hidden[0].bias.permute(1, 0, 2).reshape(1, 1, 16))
        single.head.weight.copy_(multi.head.weight.reshape(1, 16, 3) / 4)
        single.head.bias.copy_(multi.head.bias.mean(0, keepdim=True))
    x = torch.randn(5, 1, 8, 8)
    assert torch.allclose(single(x), multi(x), atol=1e-5)
