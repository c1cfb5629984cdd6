"""The session's Slurm cluster: installed when missing (root + apt-get), started once,
torn down at the end even when a test failed; skipped, with the reason, where Slurm can
neither be found nor installed."""
from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.slurm.cluster import SlurmCluster, ensure_slurm_installed


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    if os.geteuid() != 0:  # the daemons run as SlurmUser=root
        pytest.skip("a private Slurm cluster needs root")
    reason = ensure_slurm_installed()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
