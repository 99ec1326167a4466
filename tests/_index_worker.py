"""torchrun worker of tests/test_index.py: ``build_index`` on 2 gloo ranks, then ``find_copies(train_index=)``;
each rank's results as JSON."""
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
    fd_eval.build_index(cfg["train"], out / "idx", extractors=[PixelExtractor()], checkpoint_every=cfg["unit"],
                        device="cpu", num_workers=0, batch_size=3, progress=False)
    res = fd_eval.find_copies(cfg["gen"], train_index=out / "idx", extractors=[PixelExtractor()], test=cfg["test"],
                              device="cpu", **kw)
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(res.to_dict()["results"]))
    assert res.provenance["run"]["world_size"] == dist.get_world_size() == 2


if __name__ == "__main__":
    main()
