"""BYOL: online encoder -> projector -> predictor regresses an EMA target's projections."""

from __future__ import annotations

import copy

import torch

from massrl.losses import byol_per_pair, masked_mean, projection_std
from massrl.methods.base import SSLMethod
from massrl.methods.views import per_view, views_last
from massrl.models import mlp
from massrl.optim import cosine_tau


class BYOL(SSLMethod):
    ENCODERS = ("backbone", "target_backbone")
    UNUSED_KEYS = ("loss.temperature",)  # (SimCLR's)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        m = self.cfg.model
        self.projector = mlp(self.feat_dim, m.proj_hidden_dim, m.proj_output_dim)
        self.predictor = mlp(m.proj_output_dim, m.pred_hidden_dim, m.proj_output_dim)
        self.target_backbone = copy.deepcopy(self.backbone)
        self.target_projector = copy.deepcopy(self.projector)
        for p in self.target_parameters():
            p.requires_grad = False
        self.tau = self.cfg.loss.tau_base

    def target_parameters(self):
        yield from self.target_backbone.parameters()
        yield from self.target_projector.parameters()

    def ssl_step(self, batch: dict) -> dict[str, torch.Tensor]:
        views, v = batch["views"], len(batch["views"])
        x = torch.cat(views)  # view-major [V*B, ...]: one pass for all views, or one per view

        def run(module: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
            return per_view(module, inputs, v, self.cfg.model.bn_per_view)

        feats = run(self.backbone, x)
        z = run(self.projector, feats)
        p = run(self.predictor, z)
        with torch.no_grad():
            tz = run(self.target_projector, run(self.target_backbone, x))
        per_pair = byol_per_pair(views_last(p, v), views_last(tz, v))
        mask = self.pair_mask(batch)
        loss = masked_mean(per_pair, mask)
        return {"loss": loss, "feats": feats[: views[0].shape[0]], "z_std": projection_std(z),
                "tau": torch.tensor(self.tau), **self.extra_logs(per_pair, mask, batch)}

    def extra_logs(self, per_pair: torch.Tensor, mask: torch.Tensor, batch: dict
                   ) -> dict[str, torch.Tensor]:
        """Method-specific logs from the [B, V, V] per-pair losses."""
        return {}

    def after_optimizer_step(self, skipped: bool) -> None:
        # the target follows each real optimizer step (so it respects gradient accumulation), and
        # is updated before any checkpoint of this step is written; a skipped step changes nothing
        if skipped:
            return
        self.tau = cosine_tau(self.trainer.global_step, self.total_steps(),
                              self.cfg.loss.tau_base, self.cfg.loss.tau_final)
        self.ema_update(self.tau)

    @torch.no_grad()
    def ema_update(self, tau: float) -> None:
        online = [*self.backbone.parameters(), *self.projector.parameters()]
        target = list(self.target_parameters())
        torch._foreach_lerp_(target, online, 1 - tau)
        # BN running statistics follow the online network
        for src, dst in ((self.backbone, self.target_backbone),
                         (self.projector, self.target_projector)):
            for bs, bd in zip(src.buffers(), dst.buffers(), strict=True):
                bd.copy_(bs)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["massrl_ema"] = {"tau": self.tau}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("massrl_ema", {})
        self.tau = state.get("tau", self.tau)
