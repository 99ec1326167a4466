"""One rank of a two-process gloo job (tests/test_remote_stream.py): ``build_stats`` (then, when given,
``compute_stats`` and ``build_index``) over remote shards, with a process group of its own; writes ``rank{R}.json``
(notes, results, or the error's class and message) to the config's folder."""
import functools
import json
import os
import sys

import torch
import torch.distributed as dist

import fd_eval.extractors.dinov2 as dv
from fd_eval import compute_stats
from fd_eval.errors import FDEvalError
from fd_eval.index.build import build_index
from fd_eval.metrics.build import build_stats


def main(cfg_path: str) -> None:
    cfg = json.loads(open(cfg_path).read())
    dv._build_extractor = functools.partial(dv._build_extractor, _depth=cfg["depth"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if cfg.get("caches"):  # one cache folder per rank (nodes that do not share one)
        os.environ["FD_EVAL_CACHE"] = cfg["caches"][rank]
    kw = {"weights": cfg["ckpt"], "batch_size": cfg["batch_size"], "num_workers": 0, "progress": False,
          "skip_bad": cfg["skip_bad"]}
    out: dict = {"notes": []}
    try:
        res = build_stats(cfg["spec"], cfg["out"], "dinov2-vits14", log=out["notes"].append, **kw)
        out["stats"] = res is not None
        if cfg.get("compute_spec"):
            st = compute_stats(cfg["compute_spec"], "dinov2-vits14", **kw)["dinov2-vits14"]
            out["compute"] = {"n": st.n, "mu": st.mu.tolist(), "sigma": st.sigma.tolist()}
        if cfg.get("index_spec"):
            idx = build_index(cfg["index_spec"], cfg["index_out"], "dinov2-vits14", log=out["notes"].append, **kw)
            out["index"] = idx is not None
    except FDEvalError as e:
        out["error"] = [type(e).__name__, str(e)]
    with open(f"{cfg['dir']}/rank{rank}.json", "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
