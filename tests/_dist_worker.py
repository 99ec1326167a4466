"""One rank of the 2-process API checks in test_distributed.py (run under torchrun, gloo on CPU).

    python -m torch.distributed.run --nproc_per_node 2 tests/_dist_worker.py CONFIG.json

Writes OUT/rank{r}.json (and .npy arrays); the test compares them with single-process runs. Every check catches
its own expected errors so that all of them run in one launch.
"""
from __future__ import annotations

import faulthandler
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import fd_eval
from fd_eval.core.moments import MomentAccumulator
from fd_eval.metrics.metric import FDMetric, evaluate_generator
from fd_eval.run.distributed import get_rank, get_world_size, init_distributed, merge_accumulators


def noise_sampler(calls: list):
    """fn(b, size): uint8 NHWC noise from torch's global generator (seeded per batch by evaluate_generator)."""

    def fn(b: int, size: int) -> torch.Tensor:
        x = torch.randint(0, 256, (size, 40, 48, 3), dtype=torch.uint8)
        calls.append([b, size, int(x.view(-1)[:8].sum())])
        return x

    return fn


def main() -> None:
    faulthandler.enable()  # a native crash prints the Python stack of every thread
    cfg = json.loads(Path(sys.argv[1]).read_text())
    out = Path(cfg["out"])
    exs = fd_eval.load_extractors("dinov2-vits14", cfg["ckpt"], "cpu")
    assert not dist.is_initialized()
    # FDMetric finds torchrun's environment and initialises the process group itself (gloo: a CPU device)
    m = FDMetric(extractors=exs, ref=cfg["ref_stats"])
    assert dist.is_initialized() and dist.get_backend() == "gloo" and not init_distributed("cpu")
    rank, world = get_rank(), get_world_size()
    assert (m.rank, m.world_size) == (rank, world) == (int(os.environ["RANK"]), 2)
    res: dict = {"rank": rank, "world": world}

    # FDMetric: each rank updates with its own block of the images; compute merges over ranks
    gen = np.load(cfg["gen_npy"])
    block = np.array_split(np.arange(len(gen)), world)[rank]
    for i in block:  # one image per update: the chunking differs from the single-process run
        m.update(torch.from_numpy(gen[i:i + 1]))
    res["metric"] = m.compute()["results"]["dinov2-vits14"]
    res["metric_local_n"] = m.n

    # evaluate_generator: each rank draws its own batches; reuse the metric (reset inside)
    calls: list = []
    doc = evaluate_generator(noise_sampler(calls), cfg["gen_n"], cfg["gen_bs"], seed=7, metric=m)
    res["generator"] = doc["results"]["dinov2-vits14"]
    res["generator_calls"] = calls
    res["generator_prov"] = doc["provenance"]["generated"]

    # compute_stats with kept features: merged in rank order, on every rank
    st = fd_eval.compute_stats(cfg["gen_dir"], extractors=exs, batch_size=2, num_workers=0, keep_features=True,
                               progress=False)["dinov2-vits14"]
    np.save(out / f"features{rank}.npy", st.features)
    np.save(out / f"mu{rank}.npy", st.mu)
    res["stats_n"] = st.n

    # exact merge of moment triples, including a rank with no rows at all
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(n, 6, generator=g, dtype=torch.float64) * 3 + 1 for n in (5, 7, 0, 4)]
    mine = [MomentAccumulator(6), MomentAccumulator(6, keep_features=True)]
    mine[0].update(rows[2 * rank])  # acc 0: rank 0 has 5 rows, rank 1 none
    mine[1].update(rows[2 * rank + 1])  # acc 1: 7 rows and 4 rows
    merged = merge_accumulators(mine)
    np.save(out / f"merged{rank}.npy", np.stack([np.concatenate([[a.n], a.mean.numpy(), a.m2.numpy().ravel()])
                                                  for a in merged]))
    np.save(out / f"merged_feats{rank}.npy", merged[1].features().numpy())
    assert mine[0].n == (5 if rank == 0 else 0)  # inputs untouched

    # a corrupt image in rank 1's block: every rank raises the same one-line error
    try:
        fd_eval.compute_stats(cfg["bad_dir"], extractors=exs, batch_size=1, num_workers=0, progress=False)
        res["bad_image"] = None
    except fd_eval.FDEvalError as e:
        res["bad_image"] = [type(e).__name__, str(e)]

    # deferred range validation: rank 1 passes [-1, 1] floats as (0, 1); every rank raises at compute()
    m2 = FDMetric(extractors=exs, ref=cfg["ref_stats"], value_range=(0, 1), validate="deferred")
    x = torch.from_numpy(gen[block[:2]]).permute(0, 3, 1, 2).float() / 255
    m2.update(x if rank == 0 else x * 2 - 1)
    try:
        m2.compute()
        res["deferred"] = None
    except fd_eval.FDEvalError as e:
        res["deferred"] = [type(e).__name__, str(e)]

    (out / f"rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
