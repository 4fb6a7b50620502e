"""Backbones beyond ResNets: a ViT pre-trains at the run's image size, evaluates at another and
exports into plain timm; backbone options that cannot apply are clear configuration errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from massrl.cli import main
from massrl.config import ConfigError
from massrl.models import build_backbone

# a 2-block ViT with 4 px patches: small enough for the CPU, the architecture of any timm ViT
VIT = ["model.backbone=vit_tiny_patch16_224", "model.width=64", "model.cifar_stem=false",
       "model.kwargs={patch_size: 4, depth: 2, embed_dim: 48, num_heads: 3}"]


def test_vit_pretrains_evaluates_at_another_size_and_exports(tmp_path):
    run = tmp_path / "vit"
    assert main(["pretrain", *VIT, "data.name=digits", "data.image_size=16",
                 "data.batch_size=32", "trainer.max_epochs=1", "trainer.limit_train_batches=3",
                 "model.proj_hidden_dim=64", "model.pred_hidden_dim=64",
                 "trainer.progress_bar=false", f"output_dir={run}"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["knn_top1"] is not None and summary["images_seen"] == 3 * 32
    ckpt = run / "checkpoints" / "last.ckpt"
    # another size: the position embeddings are resampled (dynamic_img_size)
    assert main(["knn", f"ckpt={ckpt}", "data.image_size=24", f"output_dir={tmp_path / 'k'}"]) == 0
    result = json.loads(next((tmp_path / "k").rglob("result.json")).read_text())
    assert result["protocol"]["dataset"]["image_size"] == 24
    assert result["results"]["k=20"]["top1"] > 0.1  # (10 classes)
    assert main(["export", f"ckpt={ckpt}", f"--out={tmp_path / 'exp'}/"]) == 0
    manifest = json.loads(next((tmp_path / "exp").glob("*.json")).read_text())
    assert manifest["timm_kwargs"] == {"img_size": 16, "dynamic_img_size": True, "patch_size": 4,
                                       "depth": 2, "embed_dim": 48, "num_heads": 3}
    # plain timm, without massrl, gives the features massrl's backbone gives
    from massrl.eval.checkpoint import load_pretrained

    backbone = load_pretrained(ckpt)[0]
    x = torch.randn(2, 3, 16, 16)
    torch.save(x, tmp_path / "x.pt")
    loader = textwrap.dedent("""
        import json, os, sys
        sys.modules["massrl"] = None
        import timm, torch
        os.chdir(os.path.dirname(sys.argv[1]))
        scope = {}
        exec(json.load(open(sys.argv[1]))["load_timm"], scope)
        with torch.no_grad():
            torch.save(scope["model"](torch.load(sys.argv[2])), sys.argv[3])
    """)
    manifest_path = next((tmp_path / "exp").glob("*.json"))
    subprocess.run([sys.executable, "-c", loader, str(manifest_path), str(tmp_path / "x.pt"),
                    str(tmp_path / "y.pt")], check=True, timeout=120)
    with torch.no_grad():
        expected = backbone(x)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (["model.backbone=vit_tiny_patch16_224"],  # the default config's width 16 and CIFAR stem
     "model.width=16 applies to timm ResNets only, not 'vit_tiny_patch16_224': add "
     "model.width=64 model.cifar_stem=false"),
    (["model.backbone=vit_tiny_patch16_224", "model.width=64"],
     "model.cifar_stem=true needs a ResNet-style backbone"),
    (["model.backbone=resnet1", "model.width=64"], "unknown model.backbone 'resnet1'"),
    ([*VIT[:3], "model.kwargs.colour=3"],
     "refused its keyword arguments: .*unexpected keyword argument 'colour'.*model.kwargs"),
    ([*VIT[:3], "data.image_size=18"],  # 16 px patches: checked before training
     "cannot take data.image_size=18 images: .*divisible by patch size"),
    (["model.backbone=resnet50d"],  # a deep (three-conv) stem
     "model.cifar_stem=true needs a ResNet-style backbone with a single-conv stem"),
    ([*VIT[:3], "model.kwargs.patch_size=0"], "cannot be built with .*ZeroDivisionError"),
    (["model.backbone=resnetv2_50"], "model.width=16 applies to timm ResNets only"),
])
def test_backbone_options_that_cannot_apply_are_explained(overrides, message, capsys,
                                                          tmp_path):
    assert main(["pretrain", "data.name=digits", *overrides,
                 f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert any(re.search(message, line) for line in err.splitlines()), err


def test_resnets_keep_their_plain_timm_arguments():
    """Only architectures with a fixed input size are built for the image size: a ResNet's
    recorded arguments (and so its exports and checkpoints) stay as they were."""
    _, spec = build_backbone("resnet18", cifar_stem=True, width=16, image_size=32)
    assert spec.timm_kwargs == {"channels": [16, 32, 64, 128], "stem_width": 16}
    _, spec = build_backbone("resnet18", image_size=32)
    assert spec.timm_kwargs == {}
    with pytest.raises(ConfigError, match="unknown model.backbone"):
        build_backbone("no_such_net")


def test_a_model_too_large_for_memory_is_not_called_an_unknown_name(monkeypatch):
    """torch's failed allocation is a RuntimeError, as timm's unknown name: a model.width=4096
    ResNet-18 under a memory limit was "unknown model.backbone 'resnet18'"."""
    import timm

    def too_large(name, **kwargs):
        return torch.empty(2**62, dtype=torch.uint8)  # (more than any machine has)

    monkeypatch.setattr(timm, "create_model", too_large)
    with pytest.raises(ConfigError) as caught:
        build_backbone("resnet18", cifar_stem=True, width=4096)
    message = str(caught.value)
    assert "unknown" not in message and "can't allocate memory" in message
    assert message.startswith("model.backbone=resnet18 does not fit in memory with {'channels': "
                              "(4096, 8192, 16384, 32768), 'stem_width': 4096}")
    assert message.endswith("lower model.width, or the sizes in model.kwargs")
    with pytest.raises(ConfigError, match="^unknown model.backbone 'no_such_net'"):
        build_backbone("no_such_net")


@pytest.mark.parametrize("name, kwargs", [
    ("mobilenetv3_small_100", {}),  # a conv_head after the pooling: 1024 wide, not 576
    ("resnext50_32x4d", {"width": 16, "cifar_stem": True}),  # timm's ResNet family: width
])
def test_the_feature_width_is_what_the_backbone_returns(name, kwargs):
    from massrl.models.backbones import feature_dim

    backbone, _ = build_backbone(name, **kwargs, image_size=32)
    with torch.no_grad():
        out = backbone.eval()(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, feature_dim(backbone))


def test_a_vit_given_its_own_img_size_still_takes_other_sizes():
    from massrl.models.backbones import input_size_error

    backbone, spec = build_backbone("vit_tiny_patch16_224", image_size=32,
                                    kwargs={"img_size": 32, "patch_size": 4, "depth": 1})
    assert spec.timm_kwargs["dynamic_img_size"] is True
    assert input_size_error(backbone, 48) is None


def test_a_size_refused_by_a_bare_assert_is_still_explained():
    """A model whose size check is an `assert` without a message (the first line of an empty
    message was an IndexError) is reported by the error's type."""
    from torch import nn

    from massrl.models.backbones import input_size_error

    class FixedSize(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[-1] != 8:
                raise AssertionError  # (what a bare assert raises outside pytest's rewriting)
            return x

    assert input_size_error(FixedSize(), 16) == "AssertionError"
    assert input_size_error(FixedSize(), 8) is None
