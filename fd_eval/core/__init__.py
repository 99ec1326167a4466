"""Core math: tensors in, numbers out. Fréchet distance with its sqrtm checks (:mod:`~fd_eval.core.frechet`),
float64 moments (:mod:`~fd_eval.core.moments`), exact split matmuls (:mod:`~fd_eval.core.splitmm`), PRDC/MMD
(:mod:`~fd_eval.core.feature_metrics`), bootstrap and FD-infinity (:mod:`~fd_eval.core.uncertainty`), and the
consumer protocol a pass feeds (:mod:`~fd_eval.core.consumers`: declared states with exact merge rules;
:mod:`~fd_eval.core.topk`: top-K search)."""
