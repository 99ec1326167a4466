"""Run the ``fd-eval`` command line with DINOv2 built DEPTH blocks deep: ``python _shallow_cli.py DEPTH ARGS...``.

For subprocess tests of the real CLI (kill, resume, several ranks): the architecture and every code path are the
real ones, the network is just shallower (a checkpoint from ``save_dinov2_checkpoint(..., depth=DEPTH)``), which
makes each image ~6x cheaper on a 2-core CPU.
"""
import functools
import sys

import fd_eval.extractors.dinov2 as dv

dv._build_extractor = functools.partial(dv._build_extractor, _depth=int(sys.argv.pop(1)))

from fd_eval.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
