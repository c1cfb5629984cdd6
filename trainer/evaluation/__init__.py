"""Evaluation: exactly-once distributed inference on validation sources, COCO / dense
metrics on rank 0, results written as standard COCO json plus a ``summary.json``.

Entry points: :func:`trainer.evaluation.evaluator.evaluate` (from the training loop or a
script) and ``polytask eval`` (:mod:`trainer.evaluation.eval_main`).
"""
