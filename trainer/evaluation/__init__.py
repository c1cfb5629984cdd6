"""Evaluation: exactly-once distributed inference on validation sources, COCO / dense
metrics on rank 0, results written as standard COCO json plus a ``summary.json``.

A library: :func:`trainer.evaluation.evaluator.evaluate` takes a model and the evaluation
config, and is called by the training loop and by ``polytask eval`` (:func:`trainer.main.run_eval`).
Its data loader is :mod:`data_pipelines.streaming.eval_loader`; the PNG report is
:mod:`launcher.report`.
"""
