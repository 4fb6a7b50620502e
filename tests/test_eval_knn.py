"""Weighted kNN: known answers on hand-built points; k and temperature really change the vote."""

import pytest
import torch
import torch.nn.functional as F

from massrl.eval import knn
from massrl.eval.knn import knn_scores, knn_scores_per_k, topk_accuracy, weighted_knn


def _clusters(n_per: int = 20, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(3) * 5
    x = torch.cat([c + 0.3 * torch.randn(n_per, 3, generator=g) for c in centres])
    y = torch.arange(3).repeat_interleave(n_per)
    return x, y


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_separated_clusters_are_classified_perfectly(distance):
    train_x, train_y = _clusters(seed=0)
    test_x, test_y = _clusters(seed=1)
    top1, top5 = weighted_knn(train_x, train_y, test_x, test_y, k=5, temperature=0.07,
                              num_classes=3, distance=distance, chunk_size=7)
    assert top1 == 1.0 and top5 == 1.0


def test_k_changes_the_answer():
    # Query at angle 0; one class-0 point very close, two class-1 points a bit further.
    train = torch.tensor([[1.0, 0.0], [0.9, 0.3], [0.9, -0.3]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    s1 = knn_scores(train, labels, query, k=1, temperature=1.0, num_classes=2)
    s3 = knn_scores(train, labels, query, k=3, temperature=1.0, num_classes=2)
    assert s1.argmax(1).item() == 0
    assert s3.argmax(1).item() == 1


def test_temperature_changes_the_answer():
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    # Sharp temperature: the nearest neighbour's vote dominates the two further ones.
    sharp = knn_scores(train, labels, query, k=3, temperature=0.01, num_classes=2)
    flat = knn_scores(train, labels, query, k=3, temperature=10.0, num_classes=2)
    assert sharp.argmax(1).item() == 0
    assert flat.argmax(1).item() == 1


def test_k_larger_than_bank_and_top5_with_few_classes():
    train = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 0, 1])
    # k clamps to the bank's 4; each query finds itself (weight 1, the others' e^((s-1)/T) are
    # tiny): top-1 is exact, and top-5 of 2 classes holds every label
    top1, top5 = weighted_knn(train, labels, train, labels, k=200, temperature=0.07,
                              num_classes=2)
    assert top1 == 1.0 and top5 == 1.0
    flipped = 1 - labels  # (so the vote is not vacuous: every query now misses at top-1)
    assert weighted_knn(train, labels, train, flipped, k=200, temperature=0.07,
                        num_classes=2) == (0.0, 1.0)


def test_topk_accuracy():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05]])
    assert topk_accuracy(scores, torch.tensor([2, 0]), (1, 2)) == (0.5, 1.0)


def test_top5_counts_only_classes_that_got_votes():
    """With k=1 a query votes for one class: the 9 others are no guesses, and top-5 equals
    top-1 instead of depending on the order a sort leaves the unvoted classes in."""
    g = torch.Generator().manual_seed(0)
    bank, bank_labels = torch.randn(50, 8, generator=g), torch.arange(50) % 10
    queries, labels = torch.randn(200, 8, generator=g), torch.randint(10, (200,), generator=g)
    top1, top5 = weighted_knn(bank, bank_labels, queries, labels, k=1, temperature=0.07,
                              num_classes=10)
    assert top5 == top1 < 0.5
    # with k=50 every class has votes: top-5 counts five of them
    top1, top5 = weighted_knn(bank, bank_labels, queries, labels, k=50, temperature=0.07,
                              num_classes=10)
    assert top5 > top1


def test_labels_outside_the_classes_are_explained():
    x, y = _clusters()
    with pytest.raises(ValueError, match="train labels must lie in 0..1 \\(num_classes=2\\)"):
        weighted_knn(x, y, x, y, k=5, temperature=0.07, num_classes=2)
    with pytest.raises(ValueError, match="test labels must lie in 0..2 .*got -1..2"):
        weighted_knn(x, y, x, y - (y == 0).long(), k=5, temperature=0.07, num_classes=3)


def test_cpu_features_come_in_channels_last_and_match_the_plain_forward():
    """extract_features(channels_last=True) feeds oneDNN channels-last batches (faster); the
    features are the plain forward's, and the weights keep their layout (fine-tuning may
    follow)."""
    from torch.utils.data import DataLoader, TensorDataset

    from massrl.eval.features import extract_features
    from massrl.models import build_backbone

    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet18", True, 8, 16, {})
    x, y = torch.randn(12, 3, 16, 16), torch.arange(12)
    seen = []
    backbone.conv1.register_forward_pre_hook(
        lambda m, inp: seen.append(inp[0].is_contiguous(memory_format=torch.channels_last)))
    loader = DataLoader(TensorDataset(x, y), batch_size=6)
    feats, labels = extract_features(backbone, loader, channels_last=True)
    assert seen == [True, True] and torch.equal(labels, y)
    with torch.no_grad():
        assert torch.allclose(feats, backbone.eval()(x).flatten(1), atol=1e-5)
    assert backbone.conv1.weight.is_contiguous()


def test_a_long_extraction_writes_progress_lines_to_a_log(monkeypatch, capsys):
    """Written to a file, an evaluation said nothing until its features were all computed
    (minutes on a large split): now a line every PROGRESS_EVERY_S seconds."""
    from torch.utils.data import DataLoader, TensorDataset

    from massrl.eval import features

    monkeypatch.setattr(features, "PROGRESS_EVERY_S", 0.0)
    loader = DataLoader(TensorDataset(torch.randn(9, 4), torch.arange(9)), batch_size=3)
    features.extract_features(torch.nn.Linear(4, 2), loader, desc="features (test)")
    lines = [x for x in capsys.readouterr().out.splitlines() if x]  # (not a terminal)
    assert [line.split("  ")[0] for line in lines] == [
        "features (test): 1/3 batches", "features (test): 2/3 batches",
        "features (test): 9 images"]


def test_the_bank_is_normalised_once_with_the_same_votes_and_the_monitor_frees_its_batches():
    """Normalising the bank for every chunk of 256 test images cost a fifth of the time; the
    monitor held its batches and their concatenation at once (4x the features at the peak)."""
    from massrl.methods.monitors import _cat_freeing

    g = torch.Generator().manual_seed(0)
    bank, test = torch.randn(700, 24, generator=g), torch.randn(300, 24, generator=g)
    labels = torch.randint(0, 5, (700,), generator=g)
    scores = knn_scores(bank, labels, test, k=20, temperature=0.07, num_classes=5)
    reference = []
    for start in range(0, 300, 256):  # each chunk against the bank, normalised per chunk
        sim = F.normalize(test[start:start + 256], dim=1) @ F.normalize(bank, dim=1).T
        top_sim, top_idx = sim.topk(20, dim=1)
        votes = torch.zeros(len(sim), 5).scatter_add_(
            1, labels[top_idx], ((top_sim - top_sim[:, :1]) / 0.07).exp())
        reference.append(votes)
    assert torch.equal(scores, torch.cat(reference))
    batches = list(bank.split(64))
    assert torch.equal(_cat_freeing(batches), bank) and batches == []


def test_every_k_is_served_by_one_similarity_pass_with_each_ks_own_votes(monkeypatch):
    """`massrl knn` computed the test x bank similarity once per k (k=20 and 200: twice, the
    pass costing most of the time); the votes for each k are those of its own k nearest."""
    g = torch.Generator().manual_seed(1)
    bank, test = torch.randn(300, 16, generator=g), torch.randn(70, 16, generator=g)
    labels = torch.randint(0, 4, (300,), generator=g)
    passes = []
    real = knn._similarity
    monkeypatch.setattr(knn, "_similarity", lambda *a: passes.append(1) or real(*a))
    per_k = knn_scores_per_k(bank, labels, test, (1, 7, 50, 400), 0.1, 4, chunk_size=32)
    assert len(passes) == 3  # one per chunk of 32 test images, not one per chunk and k
    sim = F.normalize(test, dim=1) @ F.normalize(bank, dim=1).T
    order = sim.argsort(dim=1, descending=True)  # an independent full sort as the reference
    for k in (1, 7, 50, 400):
        nearest = order[:, :min(k, 300)]
        near_sim = sim.gather(1, nearest)
        votes = torch.zeros(70, 4).scatter_add_(
            1, labels[nearest], ((near_sim - near_sim[:, :1]) / 0.1).exp())
        torch.testing.assert_close(per_k[k], votes)
    assert not torch.equal(per_k[7], per_k[50])


def test_a_vote_that_underflows_still_counts_for_top5():
    """exp((sim - nearest) / T) underflows to 0 for far neighbours (euclidean, or a small T):
    their classes were taken for unvoted ones and top-5 fell to top-1."""
    bank = torch.tensor([[0.0, 0.0], [10.0, 0.0], [10.0, 0.1]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[0.0, 0.0]])
    assert weighted_knn(bank, labels, query, torch.tensor([1]), k=3, temperature=0.07,
                        num_classes=2, distance="euclidean") == (0.0, 1.0)
    # with k=1 the far class has no vote: not among the guesses, whatever the sort leaves
    assert weighted_knn(bank, labels, query, torch.tensor([1]), k=1, temperature=0.07,
                        num_classes=2, distance="euclidean") == (0.0, 0.0)


def test_top5_hits_a_label_ranked_fifth_but_not_sixth():
    angles = torch.deg2rad(torch.arange(10) * 5.0)
    bank = torch.stack([angles.cos(), angles.sin()], 1)
    labels = torch.arange(10)
    query = torch.tensor([[1.0, 0.0]])
    assert weighted_knn(bank, labels, query, torch.tensor([4]), k=10, temperature=0.1,
                        num_classes=10) == (0.0, 1.0)
    assert weighted_knn(bank, labels, query, torch.tensor([5]), k=10, temperature=0.1,
                        num_classes=10) == (0.0, 0.0)
