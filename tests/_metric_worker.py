"""torchrun worker of tests/test_consumer_metric.py: the registered test metric under 2 gloo ranks
(``compute_stats`` sharded over the ranks, and ``FDMetric`` with each rank updating its half)."""
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import _norm_metric
import fd_eval
from test_copies import PixelExtractor


def main() -> None:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    _norm_metric.register()
    ex = PixelExtractor()
    st = fd_eval.compute_stats(cfg["folder"], extractors=[ex], batch_size=3, num_workers=0, progress=False,
                               device="cpu")[ex.name]
    images = torch.from_numpy(np.load(cfg["images"]))
    rank, world = dist.get_rank(), dist.get_world_size()
    metric = fd_eval.FDMetric(extractors=[ex], ref=st, device="cpu", rank=rank, world_size=world)
    half = np.array_split(np.arange(len(images)), world)[rank]
    metric.update(images[half])
    doc = metric.compute()
    out = {"stats": st.metadata["metrics"], "fdmetric": doc["results"][ex.name]["metrics"]}
    Path(cfg["out"], f"rank{rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()
