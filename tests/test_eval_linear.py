"""Offline linear evaluation on fixed features, the frozen-backbone classifier, label fractions."""

import json
from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from massrl.eval.label_subsets import label_subset
from massrl.eval.linear import (
    Classifier,
    SGDRecipe,
    recompute_batch_norm,
    train_linear_on_features,
    train_on_images,
)


def _separable(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    w = torch.randn(16, 4, generator=torch.Generator().manual_seed(99))
    return x, (x @ w).argmax(1)


RECIPE = SGDRecipe(epochs=30, lr=0.5, batch_size=64)


def test_linearly_separable_features_reach_high_accuracy():
    (tx, ty), (vx, vy) = _separable(800, 0), _separable(400, 1)
    res = train_linear_on_features(tx, ty, vx, vy, 4, RECIPE, seed=0)
    assert res.top1 > 0.9 and res.best_top1 >= res.top1
    assert 1 <= res.best_epoch <= RECIPE.epochs and len(res.history) == RECIPE.epochs
    assert res.top5 == 1.0  # 4 classes: the top-5 always holds the label


def test_a_short_run_on_small_scale_features_is_scored_with_their_statistics():
    """Features of a narrow, briefly trained backbone: a std of ~0.03 around an offset. After
    one epoch of 5 steps the head is scored with the features' own statistics (BatchNorm's
    (0, 1) start at momentum 0.1 scored such a run near chance)."""
    (tx, ty), (vx, vy) = _separable(320, 0), _separable(400, 1)
    tx, vx = tx * 0.03 + 0.5, vx * 0.03 + 0.5
    res = train_linear_on_features(tx, ty, vx, vy, 4, SGDRecipe(epochs=1, lr=0.5, batch_size=64))
    assert res.top1 > 0.6  # (0.77 here; 0.31 with the stale statistics)


def test_a_last_batch_of_one_image_is_left_out():
    (tx, ty), (vx, vy) = _separable(65, 0), _separable(40, 1)  # batches of 64 and 1
    res = train_linear_on_features(tx, ty, vx, vy, 4, SGDRecipe(epochs=2, batch_size=64))
    assert len(res.history) == 2 and res.history[0]["loss"] > 0


def test_output_written_to_a_file_gets_a_line_per_epoch(capsys):
    """A batch job's log (stdout not a terminal) shows no live bar: each epoch prints its line."""
    (tx, ty), (vx, vy) = _separable(200, 0), _separable(100, 1)
    res = train_linear_on_features(tx, ty, vx, vy, 4, SGDRecipe(epochs=3, batch_size=64))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if " epoch " in ln]
    assert [ln.split("  ")[0] for ln in lines] == [
        f"linear (cached features) epoch {e}/3" for e in (1, 2, 3)]
    assert f"top1 {res.history[-1]['top1']:.4f}" in lines[-1]


def test_shuffled_labels_stay_near_chance():
    (tx, ty), (vx, vy) = _separable(800, 0), _separable(400, 1)
    shuffled = ty[torch.randperm(len(ty), generator=torch.Generator().manual_seed(3))]
    res = train_linear_on_features(tx, shuffled, vx, vy, 4, RECIPE, seed=0)
    assert res.top1 < 0.4  # chance is about 0.25


def test_frozen_classifier_keeps_backbone_in_eval_mode_and_unchanged():
    backbone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = Classifier(backbone, nn.Linear(8, 2), finetune=False).train()
    assert not backbone.training
    loss = model(torch.randn(16, 4)).sum()
    loss.backward()
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    assert all(p.grad is None for p in backbone.parameters())


def test_fine_tuning_starts_from_a_zero_head_that_leaves_the_backbone_alone_at_first():
    """As SimCLR fine-tunes: the first step trains only the head (a random one would push
    large, meaningless gradients into the pre-trained backbone); later steps train both."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(16, 8), nn.ReLU())
    start = [p.detach().clone() for p in backbone.parameters()]
    (x, y), (vx, vy) = _separable(64, 0), _separable(32, 1)
    test = DataLoader(TensorDataset(vx, vy), batch_size=32)

    def tune(n: int) -> list[torch.Tensor]:
        train = DataLoader(TensorDataset(x[:n], y[:n]), batch_size=32)
        train_on_images(backbone, 4, 8, train, SGDRecipe(epochs=1, lr=0.5), finetune=True,
                        test_loader=test)
        return [(p - s).abs().max() for p, s in zip(backbone.parameters(), start, strict=True)]

    assert all(change == 0 for change in tune(32))  # one step: the head only
    assert all(change > 0 for change in tune(64))  # the next step reaches the backbone


def test_label_subset_is_balanced_reproducible_and_reusable(tmp_path):
    labels = [i % 10 for i in range(1000)]
    a, path, fraction = label_subset(labels, 0.1, seed=1, dataset="toy", save_dir=tmp_path)
    b, _, _ = label_subset(labels, 0.1, seed=1, dataset="toy")
    c, _, _ = label_subset(labels, 0.1, seed=2, dataset="toy")
    assert a == b and a != c and fraction == 0.1
    assert set(Counter(labels[i] for i in a).values()) == {10}
    saved = json.loads(path.read_text())
    assert saved["indices"] == a and saved["label_fraction"] == 0.1
    # the file decides the images and the fraction recorded; another fraction contradicts it
    assert label_subset(labels, None, seed=9, dataset="toy", subset_file=path) == (a, path, 0.1)
    assert label_subset(labels, 0.1, seed=9, dataset="toy", subset_file=path)[0] == a
    with pytest.raises(ValueError, match="holds a label_fraction of 0.1, not 0.5"):
        label_subset(labels, 0.5, seed=9, dataset="toy", subset_file=path)
    with pytest.raises(ValueError, match="was made for"):
        label_subset(labels[:500], 0.1, seed=1, dataset="toy", subset_file=path)
    # indices into a split drawn another way (another eval_subset, split seed or files) would
    # name other images: refused, naming what differs
    source = {"subset": None, "eval_subset": 1000, "split_seed": 0, "files": None}
    _, made, _ = label_subset(labels, 0.1, seed=1, dataset="toy", save_dir=tmp_path / "s",
                              source=source)
    assert label_subset(labels, None, seed=1, dataset="toy", subset_file=made,
                        source=source)[0] == a
    with pytest.raises(ValueError, match="indexes another labeled split.*split_seed: 0 then, "
                                         "7 now"):
        label_subset(labels, None, seed=1, dataset="toy", subset_file=made,
                     source={**source, "split_seed": 7})


def test_a_labeled_split_is_identified_by_its_images_not_by_where_they_are(tmp_path):
    """subset_file checks this identity: the same images (a copied folder, a split drawn with
    another checkpoint's seed) pass, other images or labels do not."""
    from massrl.data.datasets import SubsetDataset
    from massrl.data.folder import FileImageDataset
    from massrl.eval.label_subsets import split_identity

    names = [f"{c}/{i}.png" for c in "ab" for i in range(3)]
    here, copy = (FileImageDataset([tmp_path / r / n for n in names], [0, 0, 0, 1, 1, 1])
                  for r in ("data", "scratch/copy"))
    assert split_identity(here) == split_identity(copy)
    assert split_identity(SubsetDataset(here, [0, 4])) == split_identity(
        SubsetDataset(SubsetDataset(copy, [4, 0, 1]), [1, 0]))
    assert split_identity(SubsetDataset(here, [0, 4])) != split_identity(
        SubsetDataset(here, [0, 5]))
    relabeled = FileImageDataset(here.paths, [0, 0, 1, 1, 1, 1])
    assert split_identity(relabeled) != split_identity(here)


@pytest.mark.parametrize(("indices", "problem"), [
    ([-1, 5], r"-1 is not a position in the split's 100 images \(0 to 99\)"),
    ([5, 100], "100 is not a position in the split's 100 images"),
    ([5, 2.5], "2.5 is not a position"),
    ([5, 7, 5], "names an image more than once"),
    ([], r"holds indices that are \[\], not a non-empty list"),
    (None, "holds no indices, not a non-empty list"),
    ({"0": 1}, "not a non-empty list"),
])
def test_a_subset_file_with_indices_a_run_never_saves_is_refused(tmp_path, indices, problem):
    """An edited or damaged file trained on the wrong images (a negative index counts from the
    end, a repeated one weighs an image twice, an empty list trains on nothing) or stopped with
    a raw IndexError / KeyError."""
    labels = [i % 10 for i in range(100)]
    _, path, _ = label_subset(labels, 0.1, seed=1, dataset="toy", save_dir=tmp_path)
    saved = json.loads(path.read_text())
    saved.pop("indices")
    if indices is not None:
        saved["indices"] = indices
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=rf"subset_file {path}.*{problem}"):
        label_subset(labels, None, seed=1, dataset="toy", subset_file=path)


@pytest.mark.parametrize("text", ["[1, 2]", "{not json", "\xff\xfe"])
def test_a_subset_file_that_is_no_saved_object_is_refused_naming_it(tmp_path, text):
    path = tmp_path / "subset.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=rf"subset_file {path} (holds a JSON list|is not the)"):
        label_subset([0, 1] * 5, None, seed=1, dataset="toy", subset_file=path)


def test_batch_norm_statistics_are_measured_again_on_the_training_images():
    """Their plain average over the batches, whatever they held before (here: stale values, as
    after a few fine-tuning steps with momentum 0.1); the layer's momentum comes back."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    bn = net[1]
    bn.running_mean.fill_(50.0), bn.running_var.fill_(0.01)
    x = torch.randn(96, 4) * 3 + 1
    batches = DataLoader(TensorDataset(x, torch.zeros(96, dtype=torch.long)), batch_size=32)
    assert recompute_batch_norm(net, batches, "cpu") == 96
    with torch.no_grad():
        h = net[0](x).view(3, 32, 3)  # the three batches' inputs to batch-norm
    torch.testing.assert_close(bn.running_mean, h.mean(1).mean(0))
    torch.testing.assert_close(bn.running_var, h.var(1, unbiased=True).mean(0))
    assert bn.momentum == 0.1 and bn.num_batches_tracked == 3
    assert recompute_batch_norm(net, batches, "cpu", max_batches=1) == 32
    assert recompute_batch_norm(nn.Linear(4, 3), batches, "cpu") == 0  # (none to measure)


def test_fine_tuning_scores_its_network_with_statistics_of_its_last_weights(monkeypatch):
    """One step per epoch at lr 0.5: statistics kept with momentum lag the weights. Each
    evaluation measures them again, so after training they are the training images' own (a
    second measurement changes nothing); the training itself is unchanged by it."""
    (x, y), (vx, vy) = _separable(64, 0), _separable(32, 1)
    train = DataLoader(TensorDataset(x, y), batch_size=64)
    test = DataLoader(TensorDataset(vx, vy), batch_size=32)

    def tune() -> tuple[nn.Module, list[float]]:
        torch.manual_seed(0)
        backbone = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU())
        result = train_on_images(backbone, 4, 8, train, SGDRecipe(epochs=4, lr=0.5),
                                 finetune=True, test_loader=test)
        return backbone, [h["loss"] for h in result.history]

    measured, losses = tune()
    import massrl.eval.linear

    monkeypatch.setattr(massrl.eval.linear, "recompute_batch_norm", lambda *a, **k: 0)
    kept, plain_losses = tune()
    assert losses == plain_losses
    stats = measured[1].running_mean.clone(), measured[1].running_var.clone()
    assert not torch.allclose(stats[0], kept[1].running_mean)
    recompute_batch_norm(measured, train, "cpu")
    torch.testing.assert_close((measured[1].running_mean, measured[1].running_var), stats)
    # the whole classifier: the head's standardiser is measured afresh too, not averaged on
    # further at each evaluation; a second measurement changes nothing there either
    from massrl.models.heads import linear_head

    head = linear_head(8, 4)
    model = Classifier(measured, head, finetune=True)
    recompute_batch_norm(model, train, "cpu")
    first = head[0].running_mean.clone(), head[0].steps
    recompute_batch_norm(model, train, "cpu")
    assert torch.equal(head[0].running_mean, first[0]) and head[0].steps == first[1] == 1
