"""Shared fixtures: the real zoo and world (built once, cached like a user's), a one-rank process group."""

import os
import socket

import pytest
import torch.distributed as dist


@pytest.fixture(scope="session")
def zoo_ready():
    from study import zoo

    return zoo.ensure_world(), zoo.ensure_zoo()


@pytest.fixture(scope="session")
def process_group():
    """A real gloo process group of one rank, as Ray Train sets up for a 1-worker trial."""
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield
