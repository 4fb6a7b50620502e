"""Export round trip: a fresh Python process without massrl loads the weights into timm and
torchvision and computes the same features as massrl's backbone."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from massrl.eval.export import export_backbone
from massrl.models import build_backbone

LOADER = textwrap.dedent("""
    import json, sys
    sys.modules["massrl"] = None  # any import of massrl now fails
    import timm, torch, torchvision
    from PIL import Image
    x = torch.load(sys.argv[1])
    out = {}
    for manifest in sys.argv[4:]:
        meta = json.load(open(manifest))
        scope = {"meta": meta}
        exec(meta["transform"], scope)  # the test transform, from the manifest alone
        out[meta["width"], "transform"] = scope["transform"](Image.open(sys.argv[3]))
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
            if lib == "timm":  # timm's data config of the model built as the manifest says
                config = timm.data.resolve_data_config({}, model=scope["model"])
                out[meta["width"], "timm_cfg"] = config
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
    """Also as safetensors (`--out x.safetensors` wrote pickled x.safetensors.pt), and with the
    test transform massrl evaluated with, which timm's data config now gives too."""
    from PIL import Image

    from massrl.data.eval_transform import EvalTransform

    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    torch.save(x, tmp_path / "x.pt")
    image = Image.fromarray(torch.randint(0, 256, (90, 120, 3), dtype=torch.uint8).numpy())
    image.save(tmp_path / "image.png")
    expected, manifests = {}, []
    for width, name, size, native in ((64, "backbone", 32, None), (16, "b.safetensors", 96, 400)):
        model, spec = build_backbone("resnet18", cifar_stem=True, width=width)
        model = _trained_stats(model)
        with torch.no_grad():
            expected[width] = model(x)
        info = export_backbone(model, spec, tmp_path / f"w{width}" / name, image_size=size,
                               mean=(0.5,) * 3, std=(0.25,) * 3, native_size=native,
                               source={"sha256": "abc"})
        meta = json.loads(Path(info["manifest_path"]).read_text())
        assert meta["feature_dim"] == expected[width].shape[1] and meta["input_size"] == size
        assert (meta["torchvision"] == "resnet18") == (width == 64)
        manifests.append(info["manifest_path"])
        expected[width, "transform"] = EvalTransform(size, (0.5,) * 3, (0.25,) * 3,
                                                     native_size=native)(image)
    assert info["weights_path"].endswith("w16/b.safetensors")
    subprocess.run([sys.executable, "-c", LOADER, str(tmp_path / "x.pt"),
                    str(tmp_path / "out.pt"), str(tmp_path / "image.png"), *manifests],
                   check=True, timeout=120)
    got = torch.load(tmp_path / "out.pt")
    assert set(got) == {(64, "timm"), (64, "torchvision"), (16, "timm"), (64, "timm_cfg"),
                        (16, "timm_cfg"), (64, "transform"), (16, "transform")}
    for width in (64, 16):
        for lib in ("timm", "torchvision") if width == 64 else ("timm",):
            torch.testing.assert_close(got[width, lib], expected[width], atol=1e-5, rtol=1e-5)
        assert torch.equal(got[width, "transform"], expected[width, "transform"])
    # at 96 px of 400 px images massrl evaluates a 0.875 centre crop of a 110 px resize
    assert got[16, "timm_cfg"] == {"input_size": [3, 96, 96], "interpolation": "bicubic",
                                   "mean": [0.5] * 3, "std": [0.25] * 3, "crop_pct": 0.875,
                                   "crop_mode": "center"}
    assert got[64, "timm_cfg"]["crop_pct"] == 1.0


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
    loads = []
    real_load = torch.load

    def load(*args, **kwargs):  # the snippet's torch.load, recorded
        loads.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    scope: dict = {}
    exec(info["load_torchvision"], scope)
    # (torch < 2.6 unpickles anything by default, which can run code from a file one was sent)
    assert [kw.get("weights_only") for kw in loads] == [True]
    with torch.no_grad():
        torch.testing.assert_close(scope["model"](x), expected, atol=1e-4, rtol=1e-4)


def test_an_old_checkpoint_whose_data_is_gone_says_what_its_test_transform_assumes():
    """Before checkpoints recorded their images' typical side, the export reads it from the
    dataset; where that is gone above 64 px the manifest's crop is an assumption, said so (it
    was recorded silently); up to 64 px the dataset is not needed (images are seen whole)."""
    from types import SimpleNamespace

    from massrl.commands.export import _pretraining_data
    from massrl.config import DataConfig

    said: list[str] = []
    for size in (96, 32):
        data = DataConfig(name="folder", root="/nonexistent/photos", image_size=size)
        run = SimpleNamespace(
            pre=SimpleNamespace(config=SimpleNamespace(data=data, seed=0),
                                meta={"data": {"mean": [0.5] * 3, "std": [0.2] * 3}}),
            warn=said.append)
        assert _pretraining_data(run) == ([0.5] * 3, [0.2] * 3, None)
    assert len(said) == 1 and said[0].startswith(
        "the size of the images of 'folder' is unknown (dataset 'folder' not found")
    assert "assumes them larger than 96 px (a 0.875 centre crop)" in said[0]
