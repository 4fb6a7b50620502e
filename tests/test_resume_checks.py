"""What a resume checks and says: the frozen keys, a checkpoint from before the probe's
standardiser, the notes on a changed run length.

Found by mutation testing: each test fails under a small plausible bug the suite missed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from massrl.config import ConfigError, build_config

TINY = ["data.name=digits", "data.image_size=16", "model.width=8", "model.proj_hidden_dim=32",
        "model.proj_output_dim=16", "model.pred_hidden_dim=32", "trainer.max_epochs=1"]


def _cfg(name: str = "fashion_mnist/byol", *extra: str):
    return build_config(config_file=name, overrides=[*TINY, *extra])


def _checkpoint_of(tmp_path: Path, cfg, state_dict=None) -> Path:
    """A file read_checkpoint accepts: the massrl marker and the run's config."""
    path = tmp_path / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"massrl": {"version": "test"}, "state_dict": state_dict or {},
                "hyper_parameters": {"config": cfg.model_dump(mode="json")}}, path)
    return path


def test_resume_with_other_backbone_kwargs_is_refused(tmp_path):
    """model.kwargs is a frozen key: a resume that changes a backbone
    keyword that changes no parameter shape (drop_path_rate) would silently continue another
    experiment; check_resume_fits cannot see it. A bug (model.kwargs dropped from
    FROZEN_KEYS) resumes with only a note."""
    from massrl.resume import check_resume_compatible

    path = _checkpoint_of(tmp_path, _cfg())
    with pytest.raises(ConfigError, match=r"model\.kwargs: \{\} in the checkpoint, "
                                          r"\{'drop_path_rate': 0\.1\} now"):
        check_resume_compatible(_cfg("fashion_mnist/byol", "model.kwargs.drop_path_rate=0.1"),
                                path)


def test_the_resume_shape_check_takes_a_checkpoint_from_before_the_probe_standardiser():
    """(test_resilience.py or test_methods.py) on_load_checkpoint moves an old checkpoint's
    probe.weight/bias to probe.1.*; the pre-flight shape check must agree, or every such run is
    refused ("the model's 'probe' parameters differ"). A bug (the probe.0.* keys of the
    standardiser not taken as present) refuses it."""
    from massrl.methods import build_method
    from massrl.resume import _changed_parameters

    model = build_method(_cfg(), num_classes=3)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("probe.")}
    old = torch.nn.Linear(model.feat_dim, 3)
    state |= {"probe.weight": old.weight.detach(), "probe.bias": old.bias.detach()}
    assert _changed_parameters({"state_dict": state}, model) == []
    # and a probe of another class count is still named
    state["probe.weight"] = torch.zeros(5, model.feat_dim)
    assert "'probe' parameters differ" in _changed_parameters({"state_dict": state}, model)[0]


def test_a_resume_that_shortens_the_run_says_so():
    """Any change of trainer.max_epochs bends the cosine schedule (the
    docstring of _length_change); a shorter run too. A bug (`before >= after`: only
    lengthening noted) is silent on 3 -> 2."""
    from massrl.resume import _length_change

    note = _length_change({"trainer": {"max_epochs": 3}}, _cfg("fashion_mnist/byol",
                                                               "trainer.max_epochs=2"))
    assert note is not None and "trainer.max_epochs 3 -> 2" in note


def test_the_length_note_of_a_massrl_run_names_the_target_schedule():
    """MASSRL is a BYOL subclass with a target network: its τ schedule
    follows the run's length too. A bug (`cfg.method == "byol"`) leaves it out."""
    from massrl.resume import _length_change

    note = _length_change({"trainer": {"max_epochs": 1}},
                          _cfg("fashion_mnist/massrl", "trainer.max_epochs=2"))
    assert "the target's τ schedule now span 2 epochs" in note
