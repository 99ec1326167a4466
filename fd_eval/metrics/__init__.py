"""Metrics: sources + extractors + consumers -> results. Resumable statistics (:mod:`~fd_eval.metrics.build`),
``FDMetric`` for training loops (:mod:`~fd_eval.metrics.metric`), CMMD (:mod:`~fd_eval.metrics.cmmd`), CLIPScore
(:mod:`~fd_eval.metrics.clipscore`), the real-vs-real ceiling (:mod:`~fd_eval.metrics.ceiling`), copy detection
(:mod:`~fd_eval.metrics.copies`, :mod:`~fd_eval.metrics.copies_result`, :mod:`~fd_eval.metrics.copy_metrics`)
and analyses (:mod:`~fd_eval.metrics.analysis`). The training index is :mod:`fd_eval.index`."""
