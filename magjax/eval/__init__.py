"""Evaluation of face embeddings: the benchmarks, quality and clustering.

* :mod:`magjax.eval.verification`: 10-fold ``.bin`` verification exactly as insightface (also
  called by the training loop);
* :mod:`magjax.eval.ijb`: IJB-B/C 1:1 readers, template aggregation modes, TAR@FAR;
* :mod:`magjax.eval.align`: 5-point similarity alignment to the ArcFace template;
* :mod:`magjax.eval.quality`: feature magnitude as quality, error-versus-reject, plots;
* :mod:`magjax.eval.cluster`: K-means / agglomerative / DBSCAN with BCubed and NMI.

The reference cases that check these against the official code run from ``magjax.refcheck``.

Everything here is NumPy / scikit-learn on host arrays: no JAX import, so the trainer can call
it between steps without touching device state.
"""
