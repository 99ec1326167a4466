"""Run the ``fd-eval`` command line with DINOv2 built DEPTH blocks deep: ``python _shallow_cli.py DEPTH ARGS...``.

For subprocess tests of the real CLI (kill, resume, several ranks): the architecture and every code path are the
real ones, the network is just shallower (a checkpoint from ``save_dinov2_checkpoint(..., depth=DEPTH)``), which
makes each image ~6x cheaper on a 2-core CPU.
"""
import functools
import os
import signal
import subprocess
import sys

import fd_eval.extractors.clip as cl
import fd_eval.extractors.dinov2 as dv
import fd_eval.run.engine as engine

dv._build_extractor = functools.partial(dv._build_extractor, _depth=int(sys.argv.pop(1)))
cl._build = functools.partial(cl._build, _depth=dv._build_extractor.keywords["_depth"])


def _signal_after_units(spec: str) -> None:
    """``FD_EVAL_TEST_SIGNAL_AFTER_UNITS=K:SIGNAME``: once K unit files are saved, the process sends itself SIGNAME
    from the main thread as it starts saving the next one, so the interruption lands at the same point on any
    machine (no timing): K units done (and recorded as saved by build_stats), the next one computed but not written.

    ``K:SIGNAME:job``: instead, another process sends SIGNAME to every process of this one's process group (start
    it in a session of its own), as a job scheduler (SLURM) stops a job: the DataLoader workers get the signal from a
    process that is not their parent. The process waits for that one, so the signal has arrived when it returns.
    """
    k, name, *job = spec.split(":")
    real, calls = engine.save_unit_file, []

    def save(*args, **kwargs):
        calls.append(1)
        if len(calls) == int(k) + 1:
            sig = getattr(signal, name)
            if job:
                code = f"import os; os.killpg({os.getpgid(0)}, {int(sig)})"
                subprocess.run([sys.executable, "-c", code], check=False)
            else:
                os.kill(os.getpid(), sig)
        real(*args, **kwargs)

    engine.save_unit_file = save  # the unit engine writes every unit file (stats and copies)

if os.environ.get("FD_EVAL_TEST_SIGNAL_AFTER_UNITS"):
    _signal_after_units(os.environ["FD_EVAL_TEST_SIGNAL_AFTER_UNITS"])

from fd_eval.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
