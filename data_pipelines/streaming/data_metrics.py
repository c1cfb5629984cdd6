"""Data-mix metrics for metrics.jsonl / W&B, from a rank's stream state (cheap: no I/O).

Figures are this rank's (the trainer logs rank 0's; with ``mixed`` composition other
ranks differ by sampling noise, with ``homogeneous`` they agree), except
``bad_samples``, which the trainer sums over all ranks:

    data/<source>/samples      samples delivered to the trainer
    data/<source>/bad_samples  samples dropped as bad (policy ``skip``), over all ranks when given
    data/<source>/epoch        epochs of the source consumed: samples read / this rank's share of an epoch
    data/<source>/target       the sampler's target fraction
    data/<source>/realised     fraction of delivered samples that came from the source
    data/task/<task>/target    target fraction of samples labelled for the task
    data/task/<task>/realised  realised fraction of samples labelled for the task
"""
from __future__ import annotations


def source_counts(state: dict) -> dict[str, dict[str, int]]:
    """Per source (in layout order), ``{"samples": delivered, "bad": dropped}`` summed
    over the rank's readers, from ``MixedSourceStream.state_dict()``."""
    counts = {name: {"samples": 0, "bad": 0} for name in state["layout"]["sources"]}
    for reader in state["readers"].values():
        for name, reader_counts in reader["sources"].items():
            counts[name]["samples"] += reader_counts["samples"]
            counts[name]["bad"] += reader_counts["bad"]
    return counts


def data_metrics(
    state: dict,
    *,
    targets: dict[str, float],
    source_tasks: dict[str, list[str]],
    bad_samples: dict[str, int] | None = None,
) -> dict[str, float]:
    """Metrics row (see module docstring) from ``MixedSourceStream.state_dict()``;
    ``bad_samples``: per source over all ranks, instead of this rank's."""
    layout = state["layout"]
    counts = source_counts(state)
    samples = {name: c["samples"] for name, c in counts.items()}
    total = sum(samples.values())
    row: dict[str, float] = {}
    for name, info in layout["sources"].items():
        rank_share = info["num_samples"] / layout["world_size"]
        bad = counts[name]["bad"]
        row[f"data/{name}/samples"] = float(samples[name])
        row[f"data/{name}/bad_samples"] = float(bad if bad_samples is None else bad_samples[name])
        row[f"data/{name}/epoch"] = (samples[name] + bad) / rank_share
        row[f"data/{name}/target"] = targets[name]
        row[f"data/{name}/realised"] = samples[name] / total if total else 0.0
    for task in dict.fromkeys(t for tasks in source_tasks.values() for t in tasks):
        labelled = [name for name, tasks in source_tasks.items() if task in tasks]
        if labelled:
            row[f"data/task/{task}/target"] = sum(targets[n] for n in labelled)
            row[f"data/task/{task}/realised"] = sum(samples[n] for n in labelled) / total if total else 0.0
    return row
