"""``python -m fd_eval ...`` = the ``fd-eval`` command; also ``torchrun --nproc_per_node 8 -m fd_eval compute ...``."""
from .cli import main

if __name__ == "__main__":
    main(prog_name="fd-eval")
