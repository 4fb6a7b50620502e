"""The batched backend's views of single images, for `massrl augviz augment.backend=batched`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from massrl.augment.views import View
from massrl.config import AugmentConfig
from massrl.data.eval_transform import channel_stats

from .engine import BatchedAugmenter
from .transform import CropOnlyTransform


class BatchedPreview:
    """`sample(img) -> list[View]` like MultiViewTransform's, the views made as in training with
    augment.backend=batched: the workers' crop, then the engine on a batch of this one image.
    The engine does not report which ops each image drew, so the views carry no op labels."""

    def __init__(self, cfg: AugmentConfig, image_size: int, mean: Sequence[float],
                 std: Sequence[float]) -> None:
        self.crops = CropOnlyTransform(cfg, image_size)
        self.source_side = self.crops.source_side  # (how far a JPEG may be decoded down)
        # one image at a time on the CPU: augment.compile (whole-batch GPU mode) does not apply,
        # and would only warn so at the start of a GPU run
        self.engine = BatchedAugmenter(cfg.model_copy(update={"compile": False}), mean, std)
        self.names = list(cfg.strategies)
        mean, std = channel_stats(mean, std)  # (one value serves the 3 channels)
        self._mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def sample(self, img: Image.Image) -> list[View]:
        item = self.crops(img)
        views = self.engine([v[None] for v in item["views"]], item["strategy"][None],
                            seeds=item["seed"][None])
        out = []
        for v, x in enumerate(views):
            level = ((x[0] * self._std + self._mean).clamp(0, 1) * 255).round().to(torch.uint8)
            picture = Image.fromarray(level.permute(1, 2, 0).numpy())
            s = int(item["strategy"][v])
            out.append(View(x[0], s, self.names[s], int(item["crop"][v]), ["batched engine"],
                            picture))
        return out
