"""Evaluation of model bundles on annotated case folders, as the seed papers reported it.

* :mod:`models.evaluation.metrics`: per-study Dice, voxel-wise sensitivity and
  precision, lesion-wise detection F1, volume difference, volume class;
* :mod:`models.evaluation.stats`: Bland-Altman (and its plot), Mann-Whitney U
  and Wilcoxon signed-rank tests;
* :mod:`models.evaluation.report`: stratified summaries (volume class, vendor)
  and the JSON + markdown report;
* :mod:`models.evaluation.runner`: every case through the service's own intake
  and inference (``service.intake.load_study``, ``service.inference.segment_lesion``).

``strokeseg evaluate`` is the command line; tests/test_model_quality.py holds the
bundled model to its card.
"""
