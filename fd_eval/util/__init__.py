"""The bottom layer, used by every other: atomic files and checksums (:mod:`~fd_eval.util.io_utils`), downloads
from the Hub and HTTP with verification (:mod:`~fd_eval.util.download`), BLAS thread limits
(:mod:`~fd_eval.util.threads`). Imports nothing of fd_eval but :mod:`fd_eval.errors`."""
