"""Export round trip: a fresh Python process without massrl loads the weights into timm and
torchvision and computes the same features as massrl's backbone."""

import json
import subprocess
import sys
import textwrap

import torch

from massrl.eval.export import export_backbone
from massrl.models import build_backbone

LOADER = textwrap.dedent("""
    import json, sys
    sys.modules["massrl"] = None  # any import of massrl now fails
    import timm, torch, torchvision
    x = torch.load(sys.argv[1])
    out = {}
    for manifest in sys.argv[3:]:
        meta = json.load(open(manifest))
        for lib in ("timm", "torchvision"):
            code = meta.get("load_" + lib)
            if code is None:
                continue
            scope = {}
            import os
            cwd = os.getcwd()
            os.chdir(os.path.dirname(manifest))
            exec(code, scope)
            os.chdir(cwd)
            with torch.no_grad():
                out[meta["width"], lib] = scope["model"](x)
    torch.save(out, sys.argv[2])
""")


def _trained_stats(model: torch.nn.Module) -> torch.nn.Module:
    # Non-default batch-norm statistics, so a load that silently missed them would show.
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, 16, 16) * 3 + 1)
    return model.eval()


def test_exported_backbone_loads_in_timm_and_torchvision_without_massrl(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    torch.save(x, tmp_path / "x.pt")
    expected, manifests = {}, []
    for width in (64, 16):
        model, spec = build_backbone("resnet18", cifar_stem=True, width=width)
        model = _trained_stats(model)
        with torch.no_grad():
            expected[width] = model(x)
        info = export_backbone(model, spec, tmp_path / f"w{width}" / "backbone", image_size=32,
                               mean=(0.5,) * 3, std=(0.25,) * 3, source={"sha256": "abc"})
        meta = json.loads((tmp_path / f"w{width}" / "backbone.json").read_text())
        assert meta["feature_dim"] == expected[width].shape[1] and meta["input_size"] == 32
        assert (meta["torchvision"] == "resnet18") == (width == 64)
        manifests.append(info["manifest_path"])
    subprocess.run([sys.executable, "-c", LOADER, str(tmp_path / "x.pt"),
                    str(tmp_path / "out.pt"), *manifests], check=True, timeout=120)
    got = torch.load(tmp_path / "out.pt")
    assert set(got) == {(64, "timm"), (64, "torchvision"), (16, "timm")}
    for (width, _lib), feats in got.items():
        torch.testing.assert_close(feats, expected[width], atol=1e-5, rtol=1e-5)


def test_a_resnext_export_loads_in_torchvision_with_the_same_features(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model, spec = build_backbone("resnext50_32x4d", cifar_stem=False, width=64)
    model = _trained_stats(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    info = export_backbone(model, spec, tmp_path / "backbone", image_size=32,
                           mean=(0.5,) * 3, std=(0.25,) * 3)
    assert info["torchvision"] == "resnext50_32x4d"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(info["load_torchvision"], scope)
    with torch.no_grad():
        torch.testing.assert_close(scope["model"](x), expected, atol=1e-4, rtol=1e-4)
