"""SimCLR: NT-Xent over all views, negatives gathered from every rank with their gradient."""

from __future__ import annotations

import torch

from massrl.config import ConfigError, RunConfig
from massrl.losses import nt_xent, projection_std
from massrl.methods.base import SSLMethod
from massrl.methods.views import per_view, views_last
from massrl.models import mlp


class SimCLR(SSLMethod):
    # no predictor, no EMA target
    UNUSED_KEYS = ("model.pred_hidden_dim", "loss.tau_base", "loss.tau_final")

    @classmethod
    def check_global_batch(cls, cfg: RunConfig, images: int) -> None:
        # with one image in the global batch there are no negatives: the loss is 0, nothing trains
        if images < 2:
            raise ConfigError("method=simclr needs at least 2 images in the global batch (the "
                              "other images are its negatives): set data.batch_size=2 or more")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        m = self.cfg.model
        self.projector = mlp(self.feat_dim, m.proj_hidden_dim, m.proj_output_dim)

    def ssl_step(self, batch: dict) -> dict[str, torch.Tensor]:
        views, v, separately = batch["views"], len(batch["views"]), self.cfg.model.bn_per_view
        feats = per_view(self.backbone, torch.cat(views), v, separately)
        z = views_last(per_view(self.projector, feats, v, separately), v)  # [B, V, D]
        z_all, offset = z, 0
        if self.trainer.world_size > 1:
            z_all, offset = self._gather_projections(z)
        loss = nt_xent(z, self.pair_mask(batch), self.cfg.loss.temperature, z_all, offset)
        return {"loss": loss, "feats": feats[: views[0].shape[0]], "z_std": projection_std(z)}

    def _gather_projections(self, z: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Every rank's [B_r, V, D] projections, concatenated in rank order, and where this
        rank's rows start (B_r differ when a rank skipped undecodable images)."""
        sizes = self.all_gather(torch.tensor([len(z)], device=z.device)).flatten().tolist()
        # sync_grads: each rank's negatives send their gradient back to the rank that made them
        z_all = self._all_gather_rows(z, sizes, sync_grads=True)
        return z_all, sum(sizes[: self.global_rank])
