"""The online monitors of a pre-training run: each validation epoch, frozen features of the
labeled train split (the bank) and of the test split, gathered over every rank, give the
weighted-kNN accuracy and the online probe's, and every eval.umap_every epochs a UMAP picture."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from lightning.pytorch.trainer.states import TrainerFn

from massrl.resilience import check_validation_features


def _first_occurrences(index: torch.Tensor) -> torch.Tensor:
    """Positions of the first occurrence of each distinct value of `index`, by ascending value."""
    values, inverse = torch.unique(index, return_inverse=True)
    pos = torch.arange(len(index), device=index.device)
    first = torch.full((len(values),), len(index), dtype=torch.long, device=index.device)
    return first.scatter_reduce_(0, inverse, pos, "amin")


class OnlineMonitors:
    """Validation hooks of SSLMethod (a mixin: it uses the LightningModule's cfg, backbone,
    probe, num_classes, normalization, trainer, log_dict and all_gather)."""

    _val_outputs: dict[int, list[tuple[torch.Tensor, ...]]]

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if "image" not in batch:
            return
        feats = self.backbone(batch["image"]).float()
        out = (feats.detach(), batch["label"].detach())
        if "index" in batch:  # lets _gather drop the sampler's padding repeats
            out += (batch["index"].detach(),)
        self._val_outputs.setdefault(dataloader_idx, []).append(out)

    def on_validation_epoch_end(self) -> None:
        outputs, self._val_outputs = self._val_outputs, {}
        if self.trainer.sanity_checking or 1 not in outputs:
            return
        bank_f, bank_y = self._gather(outputs.pop(0))  # (each batch freed once copied)
        test_f, test_y = self._gather(outputs.pop(1))
        check_validation_features(
            [bank_f, test_f], self._epochs_trained(), self.global_step,
            after_fit=self.trainer.state.fn == TrainerFn.VALIDATING,
            saved_by_step=bool(self.cfg.trainer.checkpoint_every_n_steps),
            best_saved=any(getattr(c, "monitor", None) and c.best_model_path
                           for c in self.trainer.checkpoint_callbacks))
        metrics = {}
        if self.cfg.eval.knn_every and self.num_classes:
            from massrl.eval.knn import weighted_knn

            top1, top5 = weighted_knn(
                bank_f, bank_y, test_f, test_y,  # cosine: knn normalises the features itself
                k=self.cfg.eval.knn_k, temperature=self.cfg.eval.knn_temperature,
                num_classes=self.num_classes)
            metrics["val/knn_top1"] = float(top1)
            metrics["val/knn_top5"] = float(top5)
        if self.probe is not None:
            pred = self.probe(test_f).argmax(1)
            metrics["val/probe_top1"] = float((pred == test_y).float().mean())
        # values are already global (gathered), so every rank logs the same number
        self.log_dict(metrics, prog_bar=True, sync_dist=False)
        self._maybe_umap(test_f, test_y)

    def _maybe_umap(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        every, epoch = self.cfg.eval.umap_every, self._epochs_trained()
        if not every or epoch % every or not self.trainer.is_global_zero:
            return
        from massrl.eval.umap_plot import save_umap

        path = Path(self.trainer.default_root_dir) / "umap" / f"epoch_{epoch:04d}.png"
        start = time.perf_counter()
        save_umap(feats, labels, self.normalization.get("classes"),
                  f"{self.cfg.method} on {self.cfg.data.name} (test split), epoch {epoch}", path,
                  seed=self.cfg.seed, max_points=5000)
        self.umap_seconds += time.perf_counter() - start

    def _epochs_trained(self) -> int:
        # (a validation after fit runs at current_epoch = max_epochs)
        return self.current_epoch + (self.trainer.state.fn != TrainerFn.VALIDATING)

    def _gather(self, outs: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and labels of the whole split: every rank's shard, gathered, each sample once
        and in dataset order (as one process would see them)."""
        columns = [list(column) for column in zip(*outs, strict=True)]
        outs.clear()
        parts = [_cat_freeing(column) for column in columns]
        if self.trainer.world_size == 1:
            return parts[0], parts[1]
        # shards differ in length when a rank skipped undecodable files
        sizes = self.all_gather(torch.tensor([len(parts[0])], device=parts[0].device))
        parts = [self._all_gather_rows(t, sizes.flatten().tolist()) for t in parts]
        if len(parts) == 2:  # no dataset indices: cannot tell padding repeats apart
            return parts[0], parts[1]
        # the DistributedSampler pads an uneven split with repeats: keep each index once
        keep = _first_occurrences(parts[2])
        return parts[0][keep], parts[1][keep]

    def _all_gather_rows(self, t: torch.Tensor, sizes: list[int],
                         sync_grads: bool = False) -> torch.Tensor:
        """Concatenate every rank's [sizes[r], ...] tensor in rank order (all_gather needs equal
        shapes: pad, gather, strip); `sync_grads`: the gradient flows back to each rank."""
        pad = t.new_zeros((max(sizes) - len(t), *t.shape[1:]))
        gathered = self.all_gather(torch.cat([t, pad]), sync_grads=sync_grads)
        return torch.cat([gathered[r, :n] for r, n in enumerate(sizes)])


def _cat_freeing(chunks: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat(chunks), emptying the list as it copies: the batches and their concatenation
    were held at once (with the kNN's normalised copy, 4x the bank's features at the peak)."""
    out = chunks[0].new_empty((sum(len(c) for c in chunks), *chunks[0].shape[1:]))
    end = len(out)
    while chunks:  # from the last batch back: list.pop() is O(1)
        chunk = chunks.pop()
        out[end - len(chunk):end] = chunk
        end -= len(chunk)
        del chunk
    return out
