"""Sharding an evaluation across processes (GPUs, nodes, or CPU processes on gloo).

A sharded run is one run folder that every process writes into:

1. rank 0 checks the folder (resume, `--overwrite`, "already complete") and writes the
   manifest and `examples.parquet`; it tells the other ranks the outcome (a broadcast), so a
   refusal stops every process with the same message;
2. every rank evaluates its share of the *same* batch plan as a single-process run (batch
   `i` goes to rank `i % world`; batches are length-sorted, so the shares are balanced) and
   writes `parts/part-i.parquet`, exactly the file a single process would have written;
3. all ranks report success or failure (an all-gather); rank 0 then merges the parts
   (`runner.finalize`) and a barrier holds the others until the run is complete.

Because the batches and their files are those of a single-process run, the merged run is
identical to a single-process run, and an interrupted sharded run resumes under any number
of processes (or none).

Processes come from `accelerate launch -m lensbench eval ...`, `torchrun -m lensbench eval
...`, or `lensbench eval --num-processes N`, which starts N local processes with
`torch.distributed.run`. The process group is set up by `accelerate`'s `PartialState` (NCCL on
CUDA, gloo on CPU); lensbench only needs barrier, broadcast and all-gather from it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    """This process's place in a sharded run; `world == 1` is a plain single-process run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    _group: bool = False  # a torch.distributed process group is available

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self._group:
            torch.distributed.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self._group:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self._group:
            return [obj]
        boxes = [None] * self.world
        torch.distributed.all_gather_object(boxes, obj)
        return boxes


def launched_world() -> int:
    """The number of processes a launcher (accelerate, torchrun, MPI) started, from its env."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(name):
            return int(os.environ[name])
    return 1


def init(device: str = "cpu") -> Dist:
    """Join the process group a launcher set up (through accelerate); a single process if none."""
    if launched_world() <= 1:
        return Dist()
    from accelerate import PartialState

    state = PartialState(cpu=not str(device).startswith("cuda"))
    group = torch.distributed.is_available() and torch.distributed.is_initialized()
    return Dist(state.process_index, state.num_processes, state.local_process_index, group)


def rank_device(device: str, dist: Dist) -> str:
    """Each local process gets its own GPU: `cuda` becomes `cuda:LOCAL_RANK` in a sharded run."""
    if dist.world > 1 and device in ("cuda", "auto") and torch.cuda.is_available():
        return f"cuda:{dist.local_rank % torch.cuda.device_count()}"
    return device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(argv: list[str], num_processes: int, threads: int) -> int:
    """Run `python -m lensbench ARGV --threads THREADS` in `num_processes` local processes
    (torchrun); the exit status. Every worker computes with `threads` intra-op threads, the
    count of the single-process run it must equal (the cores are oversubscribed N times)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(num_processes),
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        "-m", "lensbench", *argv, "--threads", str(threads),
    ]
    # Also for the libraries that read it (and so that torchrun does not set it to 1).
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    return subprocess.call(cmd, env=env)
