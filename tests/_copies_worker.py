"""torchrun worker of tests/test_copies_run.py: ``find_copies`` on 2 gloo ranks, each rank's result as JSON."""
import json
import sys
from pathlib import Path

import torch.distributed as dist

import fd_eval
from test_copies import PixelExtractor


def main() -> None:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    out = Path(cfg["out"])
    kw = {k: cfg[k] for k in ("top_k", "threshold", "num_workers", "batch_size", "progress")}
    res = fd_eval.find_copies(cfg["gen"], cfg["train"], extractors=[PixelExtractor()], test=cfg["test"],
                              checkpoint_dir=out / "ck", checkpoint_every=cfg["unit"], device="cpu",
                              json_path=out / "copies.json", **kw)
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(res.to_dict()))
    assert res.provenance["run"]["world_size"] == dist.get_world_size() == 2


if __name__ == "__main__":
    main()
