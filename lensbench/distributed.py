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
`torch.distributed.run` (`launch_local`: the same thread count in every worker, signals passed
on to all of them, an error shown once). The process group is set up by `accelerate`'s
`PartialState` (NCCL on CUDA, gloo on CPU); lensbench only needs barrier, broadcast and
all-gather from it.
"""

from __future__ import annotations

import codecs
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import psutil
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


# torchrun, with its own messages (log lines, the traceback of a failed run) on the file
# descriptor given first instead of stderr; the workers it starts keep the real stderr.
_TORCHRUN = (
    "import os, runpy, sys; sys.stderr = os.fdopen(int(sys.argv.pop(1)), 'w', buffering=1); "
    "runpy.run_module('torch.distributed.run', run_name='__main__', alter_sys=True)"
)


def launch_local(argv: list[str], num_processes: int, threads: int) -> int:
    """Run `python -m lensbench ARGV --threads THREADS` in `num_processes` local processes
    (torchrun) and return the exit status: 0; 2 when a worker reported a user error; 130 when
    the workers were interrupted; 1 when one crashed; or torchrun's own.

    Every worker computes with `threads` intra-op threads, the count of the single-process run
    it must equal (the cores are oversubscribed `num_processes` times).

    torchrun runs in a session of its own (and starts each worker in another), so SIGINT,
    SIGTERM and SIGHUP reach them only through this function: it passes the signal to torchrun,
    which stops its workers, waits until none is left and raises KeyboardInterrupt (a second
    signal kills them at once). What the workers write to stderr passes on as it comes, except
    that a `lensbench:` line is shown once (each rank reports an error they share); torchrun's
    own messages are shown only when a failed run left no other explanation.
    """
    read_fd, write_fd = os.pipe()
    cmd = [
        sys.executable, "-c", _TORCHRUN, str(write_fd), "--nproc-per-node", str(num_processes),
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        "-m", "lensbench", *argv, "--threads", str(threads),
    ]
    # Also for the libraries that read it (and so that torchrun does not set it to 1).
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    signals: list[int] = []
    workers: list = []  # psutil.Process of torchrun's children, found when a signal comes
    proc: subprocess.Popen | None = None
    relays: list[_Relay] = []

    def forward(signum, frame):
        # SIGHUP (a closed terminal) would kill the workers where they stand; SIGTERM lets them
        # record the interruption. A second signal kills everything at once.
        signals.append(signal.SIGTERM if signum == signal.SIGHUP else signum)
        for relay in relays:
            relay.quiet = True  # no report from the workers: the caller makes one
        if proc is not None:
            _signal_tree(proc, signals[0] if len(signals) == 1 else signal.SIGKILL, workers)

    names = ("SIGINT", "SIGTERM", "SIGHUP")
    previous = {getattr(signal, n): signal.signal(getattr(signal, n), forward) for n in names if hasattr(signal, n)}
    try:
        try:
            proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, pass_fds=(write_fd,), start_new_session=True)
        finally:
            os.close(write_fd)
        relays += [_Relay(proc.stderr, live=True), _Relay(os.fdopen(read_fd, "rb"), live=False)]
        if signals:  # one came while starting
            for relay in relays:
                relay.quiet = True
            _signal_tree(proc, signals[0], workers)
        status = _wait(proc, signals, workers)
        if signals:
            _reap(workers)
        for relay in relays:
            relay.join()
    finally:
        if proc is None:
            os.close(read_fd)
        elif proc.poll() is None:  # an error here: leave no workers behind
            _signal_tree(proc, signal.SIGKILL, workers)
        for s, handler in previous.items():
            signal.signal(s, handler)
    out, log = relays
    if signals:
        out.end_line()
        raise KeyboardInterrupt
    if status == 0:
        return 0
    if out.crashed:  # a worker's traceback is above
        return 1
    if any(m.startswith("lensbench: error:") for m in out.messages):
        return 2
    if any(m.startswith("lensbench: interrupted") for m in out.messages):
        return 130
    log.show_kept()
    return status


def _note_workers(proc: subprocess.Popen, workers: list) -> None:
    """Add torchrun's live descendants to `workers`: in sessions of their own, they would
    outlive torchrun unnoticed."""
    try:
        known = {w.pid for w in workers}
        workers.extend(c for c in psutil.Process(proc.pid).children(recursive=True) if c.pid not in known)
    except psutil.Error:
        pass


def _signal_tree(proc: subprocess.Popen, signum: int, workers: list) -> None:
    """Send `signum` to torchrun (which passes it on to its workers); SIGKILL to the workers too."""
    _note_workers(proc, workers)
    for target in [proc, *workers] if signum == signal.SIGKILL else [proc]:
        try:
            target.send_signal(signum)
        except (ProcessLookupError, psutil.Error):
            pass


def _wait(proc: subprocess.Popen, signals: list, workers: list, grace_s: float = 60.0) -> int:
    """torchrun's exit status. After a signal, its workers are noted while it stops them, and
    everything still running after `grace_s` is killed."""
    deadline = None
    while True:
        try:
            return proc.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            pass
        if signals:
            _note_workers(proc, workers)
            deadline = deadline or time.monotonic() + grace_s
            if time.monotonic() > deadline:
                _signal_tree(proc, signal.SIGKILL, workers)
                deadline = float("inf")


def _reap(workers: list, timeout_s: float = 10.0) -> None:
    """Wait for the workers torchrun was told to stop; kill those still there after `timeout_s`."""
    _, alive = psutil.wait_procs(workers, timeout=timeout_s)
    for worker in alive:
        try:
            worker.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=timeout_s)


class _Relay:
    """Reads one of torchrun's streams in a thread. The workers' stderr (`live`) passes on as it
    comes, a `lensbench:` line only the first time, a progress bar (the text after a carriage
    return) as it is drawn; torchrun's own lines are kept."""

    def __init__(self, stream, live: bool) -> None:
        self.live = live
        self.messages: list[str] = []  # distinct `lensbench:` lines, in order
        self.kept: list[str] = []  # the lines of a stream that is not live
        self.crashed = False  # a Python traceback went past
        self.quiet = False  # show nothing more
        self._mid_line = False  # what was shown does not end with a newline (a progress bar)
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def join(self, timeout_s: float = 30.0) -> None:
        """Until the stream ends (when torchrun and every worker have closed it)."""
        self._thread.join(timeout_s)

    def _write(self, text: str) -> None:
        if self.quiet or not text:
            return
        try:
            sys.stderr.write(text)
            sys.stderr.flush()
            self._mid_line = not text.endswith("\n")
        except (OSError, ValueError):  # a closed terminal
            pass

    def _read(self, stream) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        line = None  # the line being read, once begun
        bar = False  # the text is a progress bar's (it follows a carriage return)
        with stream:
            while chunk := stream.read1(1 << 16):
                for piece in re.split(r"([\r\n])", decoder.decode(chunk)):
                    if piece in ("\r", "\n"):
                        if line is not None:
                            self._line(line)
                            line = None
                        elif piece == "\n" and self._mid_line:
                            self._write("\n")  # the end of a progress bar
                        elif piece == "\n" and not bar:
                            self._line("")
                        bar = piece == "\r" and self.live
                        if bar:
                            self._write(piece)
                    elif piece and bar:  # up to the next \r or \n, as a terminal would show it
                        self._write(piece)
                    elif piece:
                        line = (line or "") + piece
        if line is not None:
            self._line(line)

    def _line(self, line: str) -> None:
        if not self.live:
            self.kept.append(line)
            return
        if line.startswith("lensbench:"):
            if line in self.messages:
                return
            self.messages.append(line)
        else:
            self.crashed = self.crashed or "Traceback (most recent call last)" in line  # maybe after "[rank1]: "
        self._write(line + "\n")

    def end_line(self) -> None:
        """End a progress bar's line, so that what follows starts on a line of its own."""
        if self._mid_line:
            self.quiet = False
            self._write("\n")

    def show_kept(self) -> None:
        self._write("".join(line + "\n" for line in self.kept))
