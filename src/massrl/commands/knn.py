"""`massrl knn`: weighted kNN accuracy of a pre-trained backbone's frozen features."""

from __future__ import annotations

import argparse

from massrl.commands.common import add_eval_args
from massrl.eval.config import KnnEvalConfig

NAME = "knn"
HELP = ("Weighted kNN (cosine, k=20 and 200, temperature 0.07) on frozen, L2-normalised backbone "
        "features in eval mode: `massrl knn ckpt=PATH [data.name=...]`.")


def configure(parser: argparse.ArgumentParser) -> None:
    add_eval_args(parser, KnnEvalConfig)


def run(args: argparse.Namespace) -> int:
    import torch.nn.functional as F

    from massrl.eval import session
    from massrl.eval.knn import weighted_knn_per_k

    r = session.start(NAME, KnnEvalConfig, args)
    if r is None:
        return 0
    session.open_data(r)
    cfg = r.cfg
    train_x, train_y = session.features(r, "train")
    test_x, test_y = session.features(r, "test")
    # cosine normalises inside weighted_knn_per_k, as for the online monitor: normalising here too
    # changed the float rounding, which flips votes where similarities crowd near 1 (an
    # EfficientNet after one epoch: 30.6 % offline against 26.4 % online on the same features)
    if cfg.normalize and cfg.distance == "euclidean":
        train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    train_x, test_x = train_x.to(r.device), test_x.to(r.device)
    accuracy = weighted_knn_per_k(train_x, train_y, test_x, test_y, cfg.k, cfg.temperature,
                                  r.splits.num_classes, cfg.distance)
    results, rows = {}, []
    for k in cfg.k:
        top1, top5 = accuracy[k]
        results[f"k={k}"] = {"k": k, "effective_k": min(k, len(train_y)),
                             "top1": top1, "top5": top5}
        shown = f"k={k}" if k <= len(train_y) else f"k={k} (bank of {len(train_y)})"
        rows.append((f"{shown} top-1", session.pct(top1)))
        if (r.splits.num_classes or 0) > 5:  # with 5 classes or fewer, top-5 is always 100 %
            rows.append((f"{shown} top-5", session.pct(top5)))
    results["num_train"], results["num_test"] = len(train_y), len(test_y)
    title = (f"kNN ({cfg.distance}, T={cfg.temperature}) - {r.pre.config.method} "
             f"{r.pre.path.name} on {cfg.data.name}")
    session.finish(r, title, results, rows)
    return 0
