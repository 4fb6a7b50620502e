"""The batched augmentation engine: every strategy on a whole batch, per-image random choices.

Workers hand over uint8 crops (transform.CropOnlyTransform); `BatchedAugmenter` turns each view into
a normalised float tensor on the training device. Per view it samples a program (policies.py: K op
slots per image) and runs slot after slot. Within a slot, images are handled by op *family* (one
affine warp for every geometric op, one fused pass for posterize/solarize/invert, ...):

* grouped mode (the CPU's): each family runs only on the images that drew it, gathered by
  index. Counting them reads tensor values, which is free on the CPU. On a GPU it runs when the
  host planned it (plan.py: the training loop samples the programs on the host from the views'
  seeds and sorts them before the batch goes to the device).
* full mode (GPUs without a plan, and augment.compile): each family that the slot can hold runs
  on the whole batch, with identity parameters for the images that drew something else. No
  host-device synchronisation, at the price of arithmetic. Where the view mode fixes each view's
  strategy, or the host counted them, each strategy's views run apart, with only its families.

On the CPU the batch is processed in chunks of a few MB so that the ~20 passes of a program stay in
cache and no large temporary goes through mmap/page faults at each op. There the op families run
as fused numba kernels (cpu_kernels/, augment.cpu_kernels) that skip the images whose parameter is
the identity: every family runs on whole chunks, and grouped mode gathers only with torch ops.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from massrl.config import AugmentConfig

from . import ops
from .buffers import BufferPool
from .families import FamilyFn, OpFamilies, use_cpu_kernels
from .flips import flip_after, flip_first, load_flipped
from .inputs import check_call, check_layout, check_plan, check_plan_inputs, check_strategy_ids
from .normalise import Normaliser
from .plan import Grouping, Plan, consecutive_runs, family_lut, group_by_family
from .policies import PolicySampler, Program


class BatchedAugmenter:
    """`aug(views, strategy, generator)`: uint8 [B,3,S,S] views -> normalised float32 views.

    `strategy` [B, V] holds each view's strategy id (an index into cfg.strategies). Views are
    expected in CropOnlyTransform's order; with cfg.asymmetric, simclr views take BYOL's second
    pipeline on odd view indices (odd crop indices in crops_x_strategies; per_strategy's one simclr
    view takes the first), as the per-image backend.
    """

    def __init__(
        self,
        cfg: AugmentConfig,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        interpolation: str = "nearest",
        grouped: bool | None = None,
        chunk_bytes: int = 8 << 20,
    ) -> None:
        self.cfg = cfg
        self.sampler = PolicySampler(cfg)
        self.normaliser = Normaliser(mean, std)
        self.grouped = grouped
        self.chunk_bytes = chunk_bytes
        self.families = OpFamilies(use_cpu_kernels(cfg.cpu_kernels), interpolation)
        self._compile_unused_told = False
        self._build()

    def _build(self) -> None:
        """The engine's working state: built here, not pickled (its op families are closures:
        an engine handed to a spawned DataLoader worker could not be sent)."""
        self._families = {g: self.families.build(g) for g in (False, True)}  # full, grouped
        self._gather = torch.empty(0)  # grouped mode's gather buffer, reused across calls
        self._outputs = BufferPool()  # CPU outputs, reused once the caller has let them go
        self._luts: dict[torch.device, Tensor] = {}  # grouped mode's op -> family, per device
        self._compiled: Callable[..., None] | None = None  # full mode under torch.compile

    def __getstate__(self) -> dict:
        built = ("_families", "_gather", "_outputs", "_luts", "_compiled")
        return {k: v for k, v in self.__dict__.items() if k not in built}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._build()

    @property
    def fused(self) -> bool:
        """Whether the op families run as fused numba kernels on the CPU."""
        return self.families.fused

    # -------------------------------------------------------------- public entry point

    def __call__(
        self,
        views: Sequence[Tensor],
        strategy: Tensor,
        generator: torch.Generator | None = None,
        seeds: Tensor | None = None,
        counts: Sequence[int] | None = None,
        plan: Plan | None = None,
    ) -> list[Tensor]:
        """seeds: int64 [B, V], each view's own (CropOnlyTransform draws them in the workers);
        without them, fresh ones from `generator`. A view's augmentation depends only on its
        seed, so it is the same whatever batch or device it is processed in.

        Off the CPU, from the host (plan.plan_batch, before the batch went to the device):
        `plan`, the programs drawn from the same seeds and their grouping, runs grouped mode
        without a synchronising read; without it, `counts` (how many views of each strategy
        `strategy` holds) lets full mode run each strategy's views apart in random view mode."""
        check_call(views, strategy, seeds, self.cfg.strategies, read_values=plan is None)
        if plan is None:  # (a plan's ids were checked when it was drawn; check_plan: the same)
            check_layout(strategy, self._strategy_of_view(strategy.shape[1]), self.cfg.view_mode)
        views = self.expand(views, strategy.shape[1])
        if not views:
            return []
        if views[0].shape[0] == 0:  # an empty batch
            return [torch.empty(v.shape, dtype=torch.float32, device=v.device) for v in views]
        grouped = self.grouped if self.grouped is not None else views[0].device.type == "cpu"
        if plan is not None:
            check_plan(plan, views[0].shape[-1], strategy, seeds)
            seeds = plan.drawn_from[1] if seeds is None else seeds  # (modes that redraw)
        with torch.autocast(views[0].device.type, enabled=False):  # keep the maths in float32
            if plan is not None and not grouped and not self.cfg.compile:
                return self._apply_planned(views, plan)
            prog = self._sample(strategy, views[0].shape[-1], generator, seeds)
            if grouped:
                return self._apply_views(views, prog, grouped)
            return self._apply_by_strategy(views, prog, strategy, counts)

    def plan(self, strategy: Tensor, seeds: Tensor, size: int) -> Plan:
        """On the host: the programs of views with these strategies and seeds, [B, V] each, and
        their grouping for the device's grouped mode (the families with translations in the
        warp, as full mode). Pass the call the same strategy ids and seeds; the CPU's grouped
        mode plans for itself and ignores a plan."""
        if seeds is None:
            raise ValueError("a plan needs the views' seeds [B, V]: the call that uses it must "
                             "pass the same seeds")
        check_plan_inputs(strategy, seeds)
        check_strategy_ids(strategy, self.cfg.strategies)
        check_layout(strategy, self._strategy_of_view(strategy.shape[1]), self.cfg.view_mode)
        prog = self._sample(strategy, size, None, seeds)
        families = self._families[False]
        return Plan(prog, group_by_family(prog, family_lut(families), len(families)), size,
                    (strategy, seeds))

    def _sample(self, strategy: Tensor, size: int, generator: torch.Generator | None,
                seeds: Tensor | None) -> Program:
        """Every view's program, view-major (view v's images at rows v * B ... v * B + B - 1)."""
        sid = strategy.t().reshape(-1)
        # view parity computed on the device: a host tensor would need a synchronising copy
        v = torch.arange(strategy.shape[1], device=sid.device)
        if self.cfg.view_mode == "crops_x_strategies":
            v = v // len(self.cfg.strategies)
        elif self.cfg.view_mode == "per_strategy":  # one simclr view: the first pipeline
            v = torch.zeros_like(v)
        odd = (v % 2 == 1).repeat_interleave(strategy.shape[0])
        per_view = None if seeds is None else seeds.t().reshape(-1)
        return self.sampler.sample(sid, size, odd, generator, per_view)

    def _apply_planned(self, views: list[Tensor], plan: Plan) -> list[Tensor]:
        """Grouped mode on the device, as the host planned it: each family on its images only,
        in one chunk, the flips as one masked pass."""
        u8 = torch.cat(views)
        if plan.prog.op.shape[0] != u8.shape[0]:
            raise ValueError(f"the plan is for {plan.prog.op.shape[0]} views, the batch has "
                             f"{u8.shape[0]}")
        x = torch.empty(u8.shape, dtype=torch.float32, device=u8.device)
        x.copy_(u8).mul_(1 / 255)
        self._run_groups(x, plan.prog, plan.grouping, self._families[False], None)
        ops.hflip_(x, plan.prog.flip)
        self.normaliser.on(x.device)(x)
        return list(x.split(views[0].shape[0]))

    def _apply_views(self, views: list[Tensor], prog: Program, grouped: bool,
                     present: list[int] | None = None) -> list[Tensor]:
        """All the views as one batch: one program, one pass per op family for every view (in
        grouped mode the chunks are taken from the views directly, without a concatenated
        copy)."""
        u8: Tensor | list[Tensor] = views
        chunk = max(1, self.chunk_bytes // max(1, views[0][0].numel() * 4))
        if len(views) > 1 and (not grouped or chunk > views[0].shape[0]):
            u8 = torch.cat(views)  # (small images: chunks spanning views, fewer of them)
        return list(self.apply(u8, prog, present).split(views[0].shape[0]))

    def _apply_by_strategy(self, views: list[Tensor], prog: Program, strategy: Tensor,
                           counts: Sequence[int] | None) -> list[Tensor]:
        """Full mode runs every op family a slot may hold on every image. Where the view mode
        fixes each view's strategy by its index (CropOnlyTransform's layout), or where the host
        says how many views each strategy has (`counts`), the views of one strategy run
        together with only that strategy's families: the full MASSRL view set at 224 px then
        reads and writes 2.2x fewer bytes (benchmarks/full_mode_traffic.py)."""
        groups = self._strategy_of_view(len(views))
        if groups is None and counts is not None:
            return self._apply_sorted(views, prog, strategy, counts)
        if groups is None:
            return self._apply_views(views, prog, grouped=False)
        n = strategy.shape[0]
        out: dict[int, Tensor] = {}
        for s in sorted(set(groups)):
            mine = [v for v, g in enumerate(groups) if g == s]
            part = prog.rows([(v * n, (v + 1) * n) for v in mine])  # (the program is view-major)
            out.update(zip(mine, self._apply_views([views[v] for v in mine], part, False, [s]),
                           strict=True))
        return [out[v] for v in range(len(views))]

    def _apply_sorted(self, views: list[Tensor], prog: Program, strategy: Tensor,
                      counts: Sequence[int]) -> list[Tensor]:
        """The images sorted by strategy on the device (a stable sort, no host read), each
        strategy's run of `counts[s]` images augmented with its own families, and the results
        put back in place."""
        sid = strategy.t().reshape(-1)
        if len(counts) != len(self.cfg.strategies) or sum(counts) != sid.numel():
            raise ValueError(f"counts must give the number of views of each of the "
                             f"{len(self.cfg.strategies)} strategies, {sid.numel()} in all; "
                             f"got {list(counts)}")
        if sid.device.type == "cpu":  # reading it is free here: check the counts
            actual = torch.bincount(sid, minlength=len(counts)).tolist()
            if actual != list(counts):
                raise ValueError(f"counts {list(counts)} do not match strategy ({actual})")
        order = torch.argsort(sid, stable=True)
        u8 = torch.cat(views).index_select(0, order)
        ranked = prog.take(order)
        out = torch.empty(u8.shape, dtype=torch.float32, device=u8.device)
        start = 0
        for s, n in enumerate(counts):
            if n:
                part = ranked.rows([(start, start + n)])
                out.index_copy_(0, order[start : start + n],
                                self.apply(u8[start : start + n], part, [s]))
            start += n
        return list(out.split(views[0].shape[0]))

    def _strategy_of_view(self, num_views: int) -> list[int] | None:
        """Each view's strategy where the view mode fixes it (None in random mode)."""
        per_view = len(self.cfg.strategies)
        if self.cfg.view_mode == "random" or per_view == 1:
            return None
        return [v % per_view for v in range(num_views)]

    def expand(self, views: Sequence[Tensor], num_views: int) -> list[Tensor]:
        """The V views: `views` itself, or in crops_x_strategies mode the shared crops that
        CropOnlyTransform hands over, each repeated for every strategy (by reference)."""
        per_crop = len(self.cfg.strategies)
        if len(views) == num_views:
            return list(views)
        if self.cfg.view_mode == "crops_x_strategies" and len(views) * per_crop == num_views:
            return [v for v in views for _ in range(per_crop)]
        raise ValueError(f"strategy has {num_views} views per image but {len(views)} view "
                         f"batches were given ({self.cfg.view_mode} mode)")

    def apply(self, u8: Tensor | Sequence[Tensor], prog: Program,
              present: list[int] | None = None) -> Tensor:
        """Run a program on uint8 images [N, 3, H, W] (or a list of such batches, taken as their
        concatenation) -> normalised float32. `present`: the strategy ids that may occur (default
        all), which bounds the op families of full mode."""
        parts = [u8] if isinstance(u8, Tensor) else list(u8)
        for p in parts:
            if p.dtype != torch.uint8 or p.dim() != 4 or p.shape[1] != 3 or (
                    p.shape[1:] != parts[0].shape[1:]):
                raise ValueError(f"views must be uint8 [B, 3, S, S], got {p.dtype} {list(p.shape)}")
        first = parts[0]
        total = sum(p.shape[0] for p in parts)
        grouped = self.grouped if self.grouped is not None else first.device.type == "cpu"
        if grouped and self.cfg.compile and not self._compile_unused_told:
            self._compile_unused_told = True
            warnings.warn("augment.compile applies to the whole-batch mode that the engine runs "
                          "on GPUs; on the CPU its ops run as fused kernels, uncompiled",
                          stacklevel=2)
        shape = (total, *first.shape[1:])
        if first.device.type == "cpu":
            out = self._outputs.empty(shape, torch.float32)
        else:
            out = torch.empty(shape, dtype=torch.float32, device=first.device)
        per_image = max(1, first[0].numel() * 4)
        # the kernels work in parallel over a chunk's images: one chunk per thread's worth
        threads = torch.get_num_threads() if self.families.fused_on(out) else 1
        step = max(1, self.chunk_bytes * threads // per_image) if grouped else max(1, total)
        slot_ops = self.sampler.slot_ops(present)
        normalise = self.normaliser.on(out.device)
        # large images on the CPU flip before the ops, as uint8 (flip_first). Small ones flip
        # after them, in one gather / flip / scatter per chunk (fewer calls than one by one),
        # and so does full mode (one masked pass, on devices with bandwidth to spare)
        early = None
        if grouped and per_image >= 64 << 10:
            prog, early = flip_first(prog)
        base = 0
        for src in parts:
            for a in range(0, src.shape[0], step):
                b = min(a + step, src.shape[0])
                x = out[base + a : base + b]
                i, j = base + a, base + b
                if early is None:
                    x.copy_(src[a:b]).mul_(1 / 255)  # 10x faster than mul(u8, out=x)
                else:
                    load_flipped(x, src[a:b], early[i:j])
                part = prog.map(lambda t, i=i, j=j: t[i:j])
                self._run(x, part, slot_ops, grouped)
                normalise(x)  # while x is in cache
                if grouped:  # (flip commutes with the per-channel normalisation)
                    flip_after(x, part.flip, per_image)  # what flip_first left, if it ran
            base += src.shape[0]
        return out

    # -------------------------------------------------------------- execution

    def _run(self, x: Tensor, prog: Program, slot_ops: list[set[int]], grouped: bool) -> None:
        if grouped:
            self._run_grouped(x, prog)
            return
        run = self._run_full
        if self.cfg.compile:
            if self._compiled is None:  # (made on first use: the augmenter stays picklable)
                # dynamic: in random view mode each strategy's share of the batch changes from
                # batch to batch; one graph per strategy then serves them all
                self._compiled = torch.compile(self._run_full, dynamic=True)
            run = self._compiled
        run(x, prog.op, prog.mag, prog.aux, prog.flip, slot_ops)

    def _run_full(self, x: Tensor, op: Tensor, mag: Tensor, aux: Tensor, flip: Tensor,
                  slot_ops: list[set[int]]) -> None:
        """Full mode: every family the slot can hold on the whole batch, slot after slot. No
        value is read on the host, so torch.compile (augment.compile) traces it as one graph
        and fuses each family's passes."""
        for k, possible in enumerate(slot_ops):
            for members, fn in self._families[False]:
                if members & possible:
                    y = fn(x, op[:, k], mag[:, k], aux[:, k])
                    if y is not x:
                        x.copy_(y)
        ops.hflip_(x, flip)  # (grouped mode flips after the normalisation)

    def _run_grouped(self, x: Tensor, prog: Program) -> None:
        """Each family on the images that drew it, slot after slot. The bookkeeping is done once
        per chunk, for every slot together (at 224 px a chunk is ~13 images and per-call costs
        are a fifth of the engine's time; plan.group_by_family)."""
        families = self._families[True]
        if x.device not in self._luts:
            self._luts[x.device] = family_lut(families).to(x.device)
        grouping = group_by_family(prog, self._luts[x.device], len(families))
        self._run_groups(x, prog, grouping, families, grouping.order.tolist())

    def _run_groups(self, x: Tensor, prog: Program, g: Grouping,
                    families: list[tuple[set[int], FamilyFn]],
                    orders: list[list[int]] | None) -> None:
        """Slot after slot, each family on its sorted run of images, or on all of them where
        they are most of the chunk. `orders` (g.order on the host, where it is free to read)
        lets large images be scattered back run by run."""
        n = x.shape[0]
        for k, sizes in enumerate(g.sizes):
            start = 0
            for f, size in enumerate(sizes[:-1]):
                if size:
                    end = start + size
                    if size >= self.families.dense_threshold(families[f][1].__name__, x) * n:
                        # most of the chunk: all images, identity parameters for the others
                        self._run_dense(x, families[f][1], prog.op[:, k], prog.mag[:, k],
                                        prog.aux[:, k])
                    else:
                        self._run_gathered(x, families[f][1], g.order[k, start:end],
                                           None if orders is None else orders[k][start:end],
                                           g.op[start:end, k], g.mag[start:end, k],
                                           g.aux[start:end, k])
                start += size

    @staticmethod
    def _run_dense(x: Tensor, fn: FamilyFn, op: Tensor, mag: Tensor, aux: Tensor) -> None:
        # gather + scatter costs ~2 passes over the images: when the members are most of the
        # chunk (or the op is a cheap single pass), it is cheaper to run on every image
        y = fn(x, op, mag, aux)
        if y is not x:
            x.copy_(y)

    def _run_gathered(self, x: Tensor, fn: FamilyFn, idx: Tensor, images: list[int] | None,
                      op: Tensor, mag: Tensor, aux: Tensor) -> None:
        """fn on the images `idx` (== `images`, where known on the host) of x, whose parameters
        are op, mag, aux."""
        # gathered into a reused buffer and (large images) scattered back run by run: a fresh
        # gather output and index_copy_ each cost ~3x as much on the CPU (page faults, slow kernel)
        need = idx.numel() * x[0].numel()
        if self._gather.numel() < need or self._gather.device != x.device:
            self._gather = x.new_empty(need)
        buf = self._gather[:need].view(idx.numel(), *x.shape[1:])
        sub = fn(torch.index_select(x, 0, idx, out=buf), op, mag, aux)
        if images is None or x[0].numel() * x.element_size() < 64 << 10:  # one call
            x.index_copy_(0, idx, sub)
            return
        for j, i, n in consecutive_runs(images):
            x[i : i + n].copy_(sub[j : j + n])


def augment_batch(
    batch: dict, augmenter: BatchedAugmenter, generator: torch.Generator | None = None
) -> dict:
    """Replace batch["views"] (uint8, from CropOnlyTransform) by augmented float views.

    For `on_after_batch_transfer`; float views (the per-image backend) pass through unchanged.
    """
    views = batch.get("views") if isinstance(batch, dict) else None
    if not views or views[0].dtype != torch.uint8:  # eval batches, skipped batches, float views
        return batch
    out = dict(batch)
    out["views"] = augmenter(views, batch["strategy"], generator, batch.get("seed"),
                             batch.get("strategy_counts"), batch.get("plan"))
    return out
