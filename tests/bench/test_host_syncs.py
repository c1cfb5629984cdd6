"""bench/host_syncs.py: the census sees each kind of call that makes the host wait for the
device, attributes it to the polytask line that made it, and tells torch's own apart."""
from pathlib import Path

import torch

from bench.host_syncs import INSIDE_TORCH, SyncCensus

HERE = Path(__file__).resolve().relative_to(Path(__file__).resolve().parents[2])


def _steps(x: torch.Tensor) -> None:
    x.sum().item()
    x.tolist()
    if x.any():
        x[x > 0]
    x.nonzero()
    x.clone().add_(1)  # no sync


def test_each_syncing_call_is_counted_where_polytask_makes_it():
    census = SyncCensus("cpu")
    with census:
        _steps(torch.arange(4.0))
        _steps(torch.arange(4.0))
    names = {}
    for (name, where), n in census.counts.items():
        assert where.startswith(f"{HERE}:") and where.endswith("(_steps)"), where
        names[name] = names.get(name, 0) + n
    assert names == {"item": 2, "tolist": 2, "__bool__": 2, "__getitem__": 2, "nonzero": 2}


def test_calls_made_by_torch_itself_are_told_apart():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), foreach=False)  # reads its step counters with .item()
    model(torch.ones(1, 3)).sum().backward()
    census = SyncCensus("cpu")
    with census:
        optimizer.step()
    assert census.counts and all(where == INSIDE_TORCH for _, where in census.counts)


def test_a_device_census_ignores_host_tensors():
    census = SyncCensus("cuda")  # no CUDA tensor here: nothing waits for a device
    with census:
        _steps(torch.arange(4.0))
    assert not census.counts
