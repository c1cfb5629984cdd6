"""Data-mix metrics for metrics.jsonl / W&B, from a rank's stream state (cheap: no I/O).

All figures are this rank's (the trainer logs rank 0's; with ``mixed`` composition
other ranks differ by sampling noise, with ``homogeneous`` they agree):

    data/<source>/samples      samples delivered to the trainer
    data/<source>/bad_samples  samples dropped as bad (policy ``skip``)
    data/<source>/epoch        epochs of the source consumed: samples read / this rank's share of an epoch
    data/<source>/target       the sampler's target fraction
    data/<source>/realised     fraction of delivered samples that came from the source
    data/task/<task>/target    target fraction of samples labelled for the task
    data/task/<task>/realised  realised fraction of samples labelled for the task
"""
from __future__ import annotations

from data_pipelines.schema import TASKS


def data_metrics(state: dict, *, targets: dict[str, float], source_tasks: dict[str, list[str]]) -> dict[str, float]:
    """Metrics row (see module docstring) from ``MixedSourceStream.state_dict()``."""
    layout = state["layout"]
    samples = {name: 0 for name in layout["sources"]}
    bad = dict(samples)
    for reader in state["readers"].values():
        for name, counts in reader["sources"].items():
            samples[name] += counts["samples"]
            bad[name] += counts["bad"]
    total = sum(samples.values())
    row: dict[str, float] = {}
    for name, info in layout["sources"].items():
        rank_share = info["num_samples"] / layout["world_size"]
        row[f"data/{name}/samples"] = float(samples[name])
        row[f"data/{name}/bad_samples"] = float(bad[name])
        row[f"data/{name}/epoch"] = (samples[name] + bad[name]) / rank_share
        row[f"data/{name}/target"] = targets[name]
        row[f"data/{name}/realised"] = samples[name] / total if total else 0.0
    for task in TASKS:
        labelled = [name for name, tasks in source_tasks.items() if task in tasks]
        if labelled:
            row[f"data/task/{task}/target"] = sum(targets[n] for n in labelled)
            row[f"data/task/{task}/realised"] = sum(samples[n] for n in labelled) / total if total else 0.0
    return row
