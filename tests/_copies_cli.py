"""Run ``fd-eval`` with DINOv2 built DEPTH blocks deep and a deterministic kill: ``python _copies_cli.py DEPTH
ARGS...``; with ``FD_EVAL_TEST_KILL_AFTER_COPIES_UNITS=K`` (or ``K:SIGNAME``) the process sends itself SIGKILL (or
SIGNAME) right after its K-th training unit file of ``fd-eval copies`` is saved (no timing: the same point on any
machine)."""
import functools
import os
import signal
import sys

import fd_eval.extractors.dinov2 as dv
import fd_eval.run.engine as engine

dv._build_extractor = functools.partial(dv._build_extractor, _depth=int(sys.argv.pop(1)))
if os.environ.get("FD_EVAL_TEST_KILL_AFTER_COPIES_UNITS"):
    k_sig = (os.environ["FD_EVAL_TEST_KILL_AFTER_COPIES_UNITS"] + ":SIGKILL").split(":")
    k, sig, real, calls = int(k_sig[0]), getattr(signal, k_sig[1]), engine.save_unit_file, []

    def save(path, header, tensors, *meta_key):
        real(path, header, tensors, *meta_key)
        if os.path.basename(path).startswith("train-"):
            calls.append(path)
            if len(calls) == k:
                os.kill(os.getpid(), sig)

    engine.save_unit_file = save  # the unit engine writes every unit file

from fd_eval.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
