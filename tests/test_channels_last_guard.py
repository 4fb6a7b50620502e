"""trainer.channels_last is turned off on the CPU for models that crash oneDNN (devices.py)."""

import sys

import pytest
from conftest import run_python

from massrl.devices import channels_last_hazards, use_channels_last
from massrl.models.backbones import build_backbone


def test_narrow_resnets_have_hazards_wide_ones_do_not():
    narrow, _ = build_backbone("resnet18", cifar_stem=True, width=8)
    wide, _ = build_backbone("resnet18", cifar_stem=True, width=16)
    assert channels_last_hazards(narrow) == ["layer2.0.downsample.0"]
    assert channels_last_hazards(wide) == []


def test_channels_last_is_kept_where_it_is_safe_and_said_where_not(capsys):
    narrow, _ = build_backbone("resnet18", cifar_stem=True, width=8)
    wide, _ = build_backbone("resnet18", cifar_stem=True, width=16)
    assert use_channels_last(True, "cpu", wide) is True
    assert use_channels_last(False, "cpu", wide) is False
    assert capsys.readouterr().out == ""
    assert use_channels_last(True, "cpu", narrow) is False
    out = capsys.readouterr().out
    assert "trainer.channels_last: off" in out and "layer2.0.downsample.0" in out
    assert "oneDNN#6035" in out and "model.width >= 16" in out
    assert use_channels_last(True, "gpu", narrow) is True  # cuDNN has no such bug


@pytest.mark.skipif(sys.platform != "linux", reason="the crash is in oneDNN's x86-64 kernels")
def test_guarded_narrow_resnet_trains_at_64_px():
    """The crash itself, in a child process: a width-8 ResNet's backward at 64 px as massrl sets
    it up (model and batch in the format use_channels_last allows) must finish."""
    code = """
import torch
from massrl.devices import use_channels_last
from massrl.models.backbones import build_backbone
model, _ = build_backbone("resnet18", cifar_stem=True, width=8)
x = torch.randn(4, 3, 64, 64)
if use_channels_last(True, "cpu", model):
    model, x = model.to(memory_format=torch.channels_last), x.contiguous(
        memory_format=torch.channels_last)
for _ in range(2):
    model(x).sum().backward()
print("done")
"""
    res = run_python(code, timeout=120)
    assert res.returncode == 0 and "done" in res.stdout, (res.returncode, res.stderr[-2000:])
