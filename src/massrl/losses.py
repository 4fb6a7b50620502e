"""Pure loss functions over a batch of views: [B, V, D] tensors and a [B, V, V] pair mask.

Losses are averaged over the selected ordered pairs (not summed as in the author's code), so the
learning rate does not depend on how many views the view mode makes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F

_Fn = TypeVar("_Fn", bound=Callable[..., torch.Tensor])


def in_float32(fn: _Fn) -> _Fn:
    """Run a loss with autocast off, so that its float32 inputs stay float32: under bf16
    autocast its einsum / matmul would round cosine similarities to ~0.004 (bf16's 8-bit
    mantissa), as large as BYOL's whole loss near convergence."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        device = tensors[0].device.type if tensors else "cpu"
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@in_float32
def byol_per_pair(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(p_i, z_j) for every ordered view pair: [B, V, D] x [B, V, D] -> [B, V, V].

    z is the (no-grad) target.
    """
    p = F.normalize(p.float(), dim=-1)
    z = F.normalize(z.float().detach(), dim=-1)
    return 2 - 2 * torch.einsum("bid,bjd->bij", p, z)


def check_pair_mask(mask: torch.Tensor, shape: torch.Size) -> None:
    if mask.dtype != torch.bool or mask.shape != shape:
        # (an integer mask would index values by its 0s and 1s)
        raise ValueError(f"the pair mask must be a bool tensor of shape {list(shape)} "
                         f"([B, V, V], True = pair used): got {mask.dtype} {list(mask.shape)}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values[mask]. When the mask selects nothing (in random view mode a batch whose
    views happen to form no within_strategy pair), 0 with a zero gradient: the step trains
    nothing instead of turning the loss into NaN."""
    check_pair_mask(mask, values.shape)
    selected = values[mask]
    if selected.numel():
        return selected.mean()
    return values.masked_fill(~mask, 0.0).sum()  # (masked_fill: values may hold -inf)


def byol_pair_loss(p: torch.Tensor, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of byol_per_pair over the pairs selected by mask ([B, V, V] bool, True = used)."""
    return masked_mean(byol_per_pair(p, z), mask)


def pair_losses_by_kind(per_pair: torch.Tensor, mask: torch.Tensor, strategy: torch.Tensor
                        ) -> dict[str, torch.Tensor]:
    """Split a [B, V, V] per-pair loss into cross- and within-strategy means (for logging; a
    kind without pairs is left out). One read of the device for both kinds."""
    same = strategy[:, :, None] == strategy[:, None, :]
    kinds = torch.stack([mask & ~same, mask & same]).flatten(1)  # [2, B*V*V]
    # (summed in float32: half-precision sums of thousands of pairs overflow or round twice)
    sums = torch.where(kinds, per_pair.flatten().unsqueeze(0), 0.0).sum(1, dtype=torch.float32)
    counts = kinds.sum(1)
    return {name: (sums[i] / n).to(per_pair.dtype) for i, (name, n) in
            enumerate(zip(("cross_strategy", "within_strategy"), counts.tolist(), strict=True))
            if n}


@in_float32
def nt_xent(
    z: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
    z_all: torch.Tensor | None = None,
    rank_offset: int = 0,
) -> torch.Tensor:
    """NT-Xent (SimCLR) generalised to V views: positives are the masked views of the same image.

    z: [B, V, D] local projections. z_all: [N, V, D] projections of the global batch (gathered
    from all ranks *with* gradient) whose rows rank_offset..rank_offset+B are this rank's; the
    negatives are every view of every other image in the global batch. For each selected pair
    (i, j) the loss is -log(exp(s_ij/t) / sum_k exp(s_ik/t)), k over the negatives and the
    anchor's positives; the mean is over pairs. Views of the anchor's own image that the mask
    leaves out (augment.pairs=within_strategy: another strategy's view) are neither positives
    nor negatives: pushing them away would teach the opposite of the invariance sought.
    """
    if not temperature > 0:
        raise ValueError(f"nt_xent's temperature must be > 0: got {temperature}")
    if z_all is None:
        z_all = z
    b, v, _ = z.shape
    check_pair_mask(mask, torch.Size((b, v, v)))
    anchors = F.normalize(z.float(), dim=-1).reshape(b * v, -1)
    keys = F.normalize(z_all.float(), dim=-1).reshape(z_all.shape[0] * v, -1)
    logits = anchors @ keys.T / temperature  # [B*V, N*V]
    # an anchor never competes with itself
    self_idx = (torch.arange(b * v, device=z.device) + rank_offset * v)
    logits[torch.arange(b * v, device=z.device), self_idx] = float("-inf")
    # the anchor's own image's views (global row rank_offset + b): the pair mask's are its
    # positives, the others are left out of the softmax
    img = torch.arange(b, device=z.device) + rank_offset
    cols = (img[:, None, None] * v + torch.arange(v, device=z.device)[None, None, :])  # [B,1,V]
    cols = cols.expand(b, v, v).reshape(b * v, v)
    own = logits.gather(1, cols).masked_fill(~mask.reshape(b * v, v), float("-inf"))
    log_prob = logits.scatter(1, cols, own).log_softmax(dim=1)
    pos_log_prob = log_prob.gather(1, cols).reshape(b, v, v)
    return -masked_mean(pos_log_prob, mask)


@in_float32
def projection_std(z: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std of L2-normalised projections: about 1/sqrt(D) when healthy,
    falling towards 0 when the representation collapses."""
    zn = F.normalize(z.detach().float().reshape(-1, z.shape[-1]), dim=-1)
    return zn.std(dim=0).mean()
