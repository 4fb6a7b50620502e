import torch
import torch.nn.functional as F

from massrl.augment import pair_mask
from massrl.losses import byol_pair_loss, nt_xent, pair_losses_by_kind, projection_std


def _all_pairs(b: int, v: int) -> torch.Tensor:
    ids = torch.arange(v).expand(b, v)
    return pair_mask(ids, ids, "all")


def test_byol_loss_zero_for_aligned_and_four_for_opposite():
    z = torch.randn(4, 2, 8)
    same = z[:, :1].expand(4, 2, 8)
    assert byol_pair_loss(same, same, _all_pairs(4, 2)).item() < 1e-5
    assert abs(byol_pair_loss(same, -same, _all_pairs(4, 2)).item() - 4.0) < 1e-5


def test_byol_loss_is_a_mean_over_pairs_not_a_sum():
    """Duplicating every view (V=2 -> V=4 with the same content) must not change the loss, so the
    learning rate does not depend on the view count."""
    p, z = torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    two = byol_pair_loss(p, z, _all_pairs(6, 2))
    four = byol_pair_loss(p.repeat(1, 2, 1), z.repeat(1, 2, 1), _all_pairs(6, 4) &
                          ~torch.eye(4, dtype=torch.bool).roll(2, 1)[None])
    assert torch.allclose(two, four, atol=1e-6)


def test_byol_loss_uses_only_masked_pairs():
    p, z = torch.randn(3, 3, 5), torch.randn(3, 3, 5)
    mask = torch.zeros(3, 3, 3, dtype=torch.bool)
    mask[:, 0, 1] = True
    expected = (2 - 2 * F.cosine_similarity(p[:, 0], z[:, 1], dim=-1)).mean()
    assert torch.allclose(byol_pair_loss(p, z, mask), expected, atol=1e-6)


def _reference_ntxent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """SimCLR's textbook two-view NT-Xent, written independently."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = z @ z.T / t
    sim.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, targets)


def test_nt_xent_matches_textbook_two_view_form():
    z = torch.randn(8, 2, 16)
    ours = nt_xent(z, _all_pairs(8, 2), temperature=0.2)
    assert torch.allclose(ours, _reference_ntxent(z[:, 0], z[:, 1], 0.2), atol=1e-5)


def test_nt_xent_with_gathered_batch_equals_full_batch():
    """A rank holding rows 4..7 of a global batch of 8 computes the loss of its anchors against
    all negatives; averaging the two ranks' losses equals the single-process loss."""
    z = torch.randn(8, 2, 16)
    full = nt_xent(z, _all_pairs(8, 2), 0.5)
    r0 = nt_xent(z[:4], _all_pairs(4, 2), 0.5, z_all=z, rank_offset=0)
    r1 = nt_xent(z[4:], _all_pairs(4, 2), 0.5, z_all=z, rank_offset=4)
    assert torch.allclose((r0 + r1) / 2, full, atol=1e-5)


def test_nt_xent_leaves_unselected_views_of_the_same_image_out():
    """pairs=within_strategy: another strategy's view of the anchor's own image is neither its
    positive nor its negative (a negative would push apart what the method should bring
    together). Checked against a loop over anchors written from the definition."""
    torch.manual_seed(0)
    b, v, t = 4, 3, 0.5
    z = torch.randn(b, v, 8)
    strategy = torch.tensor([[0, 0, 1]]).expand(b, v)
    mask = pair_mask(strategy, torch.zeros(b, v, dtype=torch.long), "within_strategy")
    zn = F.normalize(z, dim=-1)
    losses = []
    for i in range(b):
        for a in range(v):
            for p in range(v):
                if not mask[i, a, p]:
                    continue
                cands = [(j, c) for j in range(b) for c in range(v)
                         if (j != i) or (c != a and mask[i, a, c])]
                sims = torch.stack([zn[i, a] @ zn[j, c] / t for j, c in cands])
                losses.append(-(zn[i, a] @ zn[i, p] / t - torch.logsumexp(sims, 0)))
    expected = torch.stack(losses).mean()
    assert torch.allclose(nt_xent(z, mask, t), expected, atol=1e-5)


def test_nt_xent_temperature_matters_and_gradients_flow():
    z = torch.randn(8, 3, 16, requires_grad=True)
    a = nt_xent(z, _all_pairs(8, 3), 0.1)
    b = nt_xent(z, _all_pairs(8, 3), 1.0)
    assert not torch.allclose(a, b)
    a.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_pair_losses_by_kind_split():
    per_pair = torch.arange(9.0).reshape(1, 3, 3)
    strategy = torch.tensor([[0, 0, 1]])
    mask = _all_pairs(1, 3)
    kinds = pair_losses_by_kind(per_pair, mask, strategy)
    assert kinds["within_strategy"].item() == (1 + 3) / 2  # pairs (0,1), (1,0)
    assert kinds["cross_strategy"].item() == (2 + 5 + 6 + 7) / 4


def test_projection_std_detects_collapse():
    healthy = projection_std(torch.randn(512, 64))
    collapsed = projection_std(torch.ones(512, 64) + 1e-4 * torch.randn(512, 64))
    assert abs(healthy.item() - 64 ** -0.5) < 0.02
    assert collapsed.item() < 0.01


def test_a_batch_without_selected_pairs_gives_zero_not_nan():
    """within_strategy pairs in random view mode: a small batch can draw no shared strategy."""
    p = torch.randn(4, 2, 8, requires_grad=True)
    z = torch.randn(4, 2, 8, requires_grad=True)
    none = torch.zeros(4, 2, 2, dtype=torch.bool)
    for loss in (byol_pair_loss(p, z, none), nt_xent(z, none, 0.2)):
        assert loss.item() == 0.0
        loss.backward()  # attached to the graph: the step runs and changes nothing
    assert not p.grad.any() and not z.grad.any()


def test_losses_stay_float32_under_bf16_autocast():
    """The training step runs under bf16 autocast; the losses' einsum / matmul must not."""
    g = torch.Generator().manual_seed(0)
    p, z = torch.randn(8, 3, 32, generator=g), torch.randn(8, 3, 32, generator=g)
    mask = pair_mask(torch.zeros(8, 3, dtype=torch.long), torch.arange(3).expand(8, 3))
    plain = (byol_pair_loss(p, z, mask), nt_xent(z, mask, 0.2), projection_std(z))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = (byol_pair_loss(p, z, mask), nt_xent(z, mask, 0.2), projection_std(z))
    for a, b in zip(plain, mixed, strict=True):
        assert b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_projection_std_detects_collapse_to_a_common_non_constant_direction():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(64, generator=g)
    collapsed = v.expand(512, 64) + 1e-4 * torch.randn(512, 64, generator=g)
    assert projection_std(collapsed).item() < 0.01
