"""The run engine: one loop for every command. :mod:`~fd_eval.run.options` (``RunOptions`` ->
``RunOptions.resolve()`` -> ``ResolvedRun``), :mod:`~fd_eval.run.pipeline` (``run_units``: decode once, every
extractor, every consumer), :mod:`~fd_eval.run.engine` (units, unit files, resume/refuse, ranks, errors, cleanup),
:mod:`~fd_eval.run.distributed` (rank glue), :mod:`~fd_eval.run.preflight` (checks before a long run),
:mod:`~fd_eval.run.provenance` (one provenance schema for every result)."""
