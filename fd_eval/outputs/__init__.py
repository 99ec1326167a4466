"""Files and documents: statistics files (:mod:`~fd_eval.outputs.stats`, :mod:`~fd_eval.outputs.stats_files`),
the reference registry and its downloads (:mod:`~fd_eval.outputs.references`,
:mod:`~fd_eval.outputs.reference_fetch`), evaluation prompts (:mod:`~fd_eval.outputs.prompts`), the HTML report
(:mod:`~fd_eval.outputs.report`, :mod:`~fd_eval.outputs.report_charts`) and contact sheets
(:mod:`~fd_eval.outputs.contact_sheet`)."""
