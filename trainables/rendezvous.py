"""How a trial's ranks find each other: a file on a local study, Ray Train's TCP store on a cluster.

    torch_config(use_gpu, run_dir, local) -> the `TorchConfig` a trial's `TorchTrainer` takes

Ray Train (2.60, `ray/train/torch/config.py` `_TorchBackend.on_start`) sets up the process
group with `init_method="env"`: rank 0's node IP and a free port become MASTER_ADDR /
MASTER_PORT, and `init_process_group` makes rank 0 serve a torch.distributed `TCPStore` there
while the trial trains. torch binds that server to every interface (it has no bind-address
setting) and it takes no credentials, so on a laptop anyone who can reach the machine could
talk to a trial's store. A local study's workers all run on this machine, so they need no
TCP for it: here they meet through a `FileStore` (the file rendezvous of
torch.distributed) in `<run_dir>/.rendezvous/`, a directory only this user can open, a fresh
file each time Ray Train starts (or restarts) the worker group, removed when it stops.

What remains on a local study is gloo's own pair sockets, which carry the collectives: gloo
binds them to the address the machine's hostname resolves to, unless GLOO_SOCKET_IFNAME names
an interface; study.study.start_ray sets it to `loopback_interface()` for a local study.

On a cluster (`--address`), a trial's ranks may sit on several machines: Ray Train's own TCP
rendezvous stays, as Ray sets it up.

Ray Train has no option for a file rendezvous (`TorchConfig.init_method` is "env" or "tcp"),
so `_FileStoreBackend` is Ray's backend with only the rendezvous replaced; it relies on Ray
internals that tests/test_internals.py names.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import ray
from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

STORE_DIR = ".rendezvous"  # in the trial's run directory (Ray Train's storage for the trial)


def torch_config(use_gpu: bool, run_dir: str | os.PathLike, local: bool) -> TorchConfig:
    """The process-group setup of a trial: nccl on GPU, gloo on CPU (Ray Train's defaults).

    local: the trial runs on the local Ray that study.run started (every rank on this machine):
        its ranks meet through a file in `<run_dir>/.rendezvous/` and no TCP store listens.
        False (a cluster at --address): Ray Train's env:// rendezvous, a TCPStore on rank 0.
    """
    backend = "nccl" if use_gpu else "gloo"
    if not local:
        return TorchConfig(backend=backend)
    return FileRendezvousConfig(backend=backend, store_dir=str(Path(run_dir) / STORE_DIR))


def loopback_interface() -> str:
    """The name of the network interface that holds 127.0.0.1 ("lo" on Linux, "lo0" on macOS):
    the GLOO_SOCKET_IFNAME of a local study. Falls back to "lo" where none is found."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == "127.0.0.1" for a in addresses):
            return name
    return "lo"


@dataclass
class FileRendezvousConfig(TorchConfig):
    """Ray Train's TorchConfig whose ranks meet through a torch `FileStore` under `store_dir`
    (every rank on one machine) instead of a TCPStore on rank 0."""

    store_dir: str = ""

    @property
    def backend_cls(self):
        return _FileStoreBackend


class _FileStoreBackend(_TorchBackend):
    """`_TorchBackend.on_start` with a FileStore in place of MASTER_ADDR/MASTER_PORT (no TPU paths:
    a local study trains on CPU or GPU). Runs in the trial's Ray Train controller."""

    def on_start(self, worker_group, backend_config: FileRendezvousConfig):
        store_dir = Path(backend_config.store_dir)
        # A worker group that died (Ray Train restarts it) may have left its file: every start gets a new one.
        shutil.rmtree(store_dir, ignore_errors=True)
        store_dir.mkdir(parents=True, mode=0o700)
        path = str(store_dir / uuid.uuid4().hex)
        if not isinstance(worker_group, V1WorkerGroup):
            worker_group.execute(_set_torch_distributed_env_vars)
        size = len(worker_group)
        # (positional: execute_single_async's own first parameter is called `rank`)
        ray.get([worker_group.execute_single_async(rank, _join, path, backend_config.backend, rank, size,
                                                   backend_config.timeout_s)
                 for rank in range(size)])

    def on_shutdown(self, worker_group, backend_config: FileRendezvousConfig):
        try:
            super().on_shutdown(worker_group, backend_config)
        finally:
            shutil.rmtree(backend_config.store_dir, ignore_errors=True)


def _join(path: str, backend: str, rank: int, world_size: int, timeout_s: float) -> None:
    """On each worker: join the process group through the FileStore at `path` (a store object, not a
    file:// URL, which torch does not unquote: a storage path with '?' or '#' would break it)."""
    import torch.distributed as dist

    if backend == "nccl" and not {"TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_BLOCKING_WAIT"} & set(os.environ):
        os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"  # as Ray Train sets it: a hung collective fails
    store = dist.FileStore(path, world_size)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
