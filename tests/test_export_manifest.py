"""What an export and a loaded checkpoint hold: the online backbone in eval mode, the pre-training
normalisation, the image size, the file names.

Found by mutation testing: each test fails under a small plausible bug the suite missed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


def test_a_loaded_checkpoints_backbone_is_in_eval_mode(tmp_path):
    """load(p).backbone is documented 'in eval mode on the CPU':
    `load(p).backbone(images)` then uses the pre-training batch-norm statistics and leaves them
    as they are. A bug (backbone.eval() dropped) gives a train-mode backbone whose every
    call normalises with the batch's statistics and overwrites the running ones."""
    from test_eval_commands import make_checkpoint

    from massrl.eval.checkpoint import load

    pre = load(make_checkpoint(tmp_path / "tiny.ckpt"))
    assert not any(m.training for m in pre.backbone.modules())
    before = {k: v.clone() for k, v in pre.backbone.state_dict().items()}
    a = pre.backbone(torch.randn(4, 3, 16, 16))
    b = pre.backbone(torch.randn(4, 3, 16, 16))
    assert a.shape == b.shape
    assert all(torch.equal(before[k], v) for k, v in pre.backbone.state_dict().items())


def test_the_export_manifest_records_the_pretraining_normalisation(tmp_path):
    """(test_eval_commands.py, beside test_umap_and_export's `meta["mean"] is not None`) the
    manifest's mean and std are the pre-training data's, each in its place. A bug (mean and
    std swapped) writes a manifest whose snippet normalises every image wrongly."""
    from test_eval_commands import make_checkpoint

    from massrl.cli import main

    ckpt = make_checkpoint(tmp_path / "tiny.ckpt")  # digits: mean 0.3053, std 0.3759
    assert main(["export", f"ckpt={ckpt}", "device=cpu", "--out", str(tmp_path / "bb.pt")]) == 0
    meta = json.loads((tmp_path / "bb.json").read_text())
    assert meta["mean"] == pytest.approx([0.3053] * 3)
    assert meta["std"] == pytest.approx([0.3759] * 3)
    assert meta["timm_pretrained_cfg"]["mean"] == meta["mean"]


def test_the_export_manifest_sees_images_at_their_own_size_whole(tmp_path):
    """STL-10's 96 px images at image_size=96 are evaluated whole
    (test_resize: native_size >= image_size); the manifest must give the same transform as
    massrl's evaluations. A bug (the checkpoint's recorded native_size not read) and another
    (export_backbone ignoring native_size) write a 0.875 centre crop of a 110 px resize."""
    from test_eval_commands import make_checkpoint

    from massrl.cli import main

    path = make_checkpoint(tmp_path / "stl.ckpt", data={"name": "digits", "image_size": 96})
    ckpt = torch.load(path, weights_only=False)
    ckpt["massrl"]["data"] = {"mean": [0.45] * 3, "std": [0.26] * 3, "native_size": 96}
    torch.save(ckpt, path)
    assert main(["export", f"ckpt={path}", "device=cpu", "--out", str(tmp_path / "bb.pt")]) == 0
    meta = json.loads((tmp_path / "bb.json").read_text())
    assert meta["test_transform"] == {"resize": 96, "center_crop": 96, "crop_ratio": 1.0,
                                      "interpolation": "bicubic"}
    assert meta["timm_pretrained_cfg"]["crop_pct"] == 1.0


def test_an_export_name_with_a_dot_keeps_its_whole_name():
    """'.pt added to any other name' (export_backbone's docstring):
    exports named run.e10 and run.e20 are two files. A bug (with_suffix: the '.e10' cut off)
    writes both to run.pt and run.json, the second replacing the first."""
    from massrl.eval.export import export_paths

    assert export_paths("out/run.e10") == (Path("out/run.e10.pt"), Path("out/run.e10.json"))
    assert export_paths("out/run.safetensors") == (Path("out/run.safetensors"),
                                                    Path("out/run.json"))


def test_an_old_checkpoint_exports_its_configs_normalisation_without_its_data(tmp_path):
    """a checkpoint from before the normalisation was recorded, whose
    data.mean/std were set in its config and whose dataset is not on this machine: the manifest
    takes the config's values. A bug (only the recorded values read) writes null."""
    from test_eval_commands import make_checkpoint

    from massrl.cli import main

    ckpt = make_checkpoint(tmp_path / "old.ckpt", data={
        "name": "cifar10", "root": str(tmp_path / "gone"), "image_size": 16,
        "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]})
    assert main(["export", f"ckpt={ckpt}", "device=cpu", "--out", str(tmp_path / "bb.pt")]) == 0
    meta = json.loads((tmp_path / "bb.json").read_text())
    assert meta["mean"] == [0.4, 0.5, 0.6] and meta["std"] == [0.2, 0.25, 0.3]


def test_evaluation_and_export_take_the_online_backbone_not_the_target(tmp_path):
    """A BYOL/MASSRL checkpoint holds backbone.* (online) and
    target_backbone.* (EMA) weights of one shape: load() must take the online ones. A bug
    (the target's prefix) is caught today only because the suite's synthetic checkpoint has no
    target_backbone.* keys; on a real BYOL checkpoint it evaluates and exports the EMA target."""
    from test_eval_commands import make_checkpoint

    from massrl.eval.checkpoint import load

    path = make_checkpoint(tmp_path / "byol.ckpt")
    ckpt = torch.load(path, weights_only=False)
    online = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("backbone.")}
    ckpt["state_dict"] |= {"target_" + k: (v + 1 if v.is_floating_point() else v)
                           for k, v in online.items()}
    torch.save(ckpt, path)
    loaded = load(path).backbone.state_dict()
    assert all(torch.equal(loaded[k.removeprefix("backbone.")], v) for k, v in online.items())
