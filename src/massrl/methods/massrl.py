"""MASSRL (Tran et al. 2022): BYOL whose views come from several augmentation strategies.

The objective is BYOL's; what differs is the views (built by massrl.augment from
`augment.strategies` and `augment.view_mode`). This class adds the diagnostic that matters for
the method: the loss between views of *different* strategies vs views of the *same* strategy.
"""

from __future__ import annotations

import torch

from massrl.losses import pair_losses_by_kind
from massrl.methods.byol import BYOL


class MASSRL(BYOL):
    def extra_logs(self, per_pair: torch.Tensor, mask: torch.Tensor, batch: dict
                   ) -> dict[str, torch.Tensor]:
        kinds = pair_losses_by_kind(per_pair.detach(), mask, batch["strategy"])
        return {f"loss_{k}": v for k, v in kinds.items()}
