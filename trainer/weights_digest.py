"""One sha256 over a model's weights: names and raw bytes, in sorted order.

``summary.json``'s replica digests and ``polytask eval``'s log line use it, so the weights
an evaluation loaded can be matched with the weights a run ended with.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        h.update(name.encode())
        # raw bytes (a uint8 view): also for bf16, which numpy has no type for
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
