"""Devices of a repair, and data parallelism over several of them.

`device="cuda:0,cuda:1"` gives each device a replica of the model (or, layer by layer,
its own copy of the block that runs) and a share of the batches. Column Fisher sums,
Hessian sums and token counts add over samples, so the shares' sums are added on the
first device and the result equals the one-device run up to float summation order.
Replicas run in one thread each: PyTorch releases the GIL inside kernels, and autograd
runs independent graphs from several threads.

Only the calling thread reports progress and checks cancellation; workers post "one
batch done" to a queue and stop at their next batch once told to.
"""

from __future__ import annotations

import queue
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, TypeVar

from hcnr_core.errors import HCNRError

if TYPE_CHECKING:  # torch is imported where used: RepairConfig must stay torch-free
    import torch

T = TypeVar("T")
R = TypeVar("R")
ONE_DEVICE = re.compile(r"cpu|cuda(:\d+)?|mps")


class DeviceUnavailableError(HCNRError):
    """A configured device does not exist on this machine."""

    code = "device_unavailable"


def parse_devices(spec: str) -> list[str]:
    """'cpu', 'cuda', 'cuda:N', 'mps', or a comma-separated list of distinct CUDA devices
    ('cuda:0,cuda:1'); 'cpu' may repeat (replicas sharing the host's cores).

    Raises ValueError with the reason; no device is touched.
    """
    names = [part.strip() for part in spec.split(",")]
    bad = [n for n in names if not ONE_DEVICE.fullmatch(n)]
    if bad:
        raise ValueError(f"unknown device {bad[0]!r}: use cpu, cuda, cuda:N or mps")
    if len(names) == 1:
        return names
    if "mps" in names:
        raise ValueError("mps cannot be combined with other devices")
    if "cuda" in names:
        raise ValueError("name each GPU of a device list by index (cuda:0,cuda:1)")
    if len({n for n in names if n.startswith("cuda")}) != sum(n.startswith("cuda") for n in names):
        raise ValueError("a GPU appears twice in the device list")
    return names


def resolve_devices(spec: str) -> list[torch.device]:
    """The configured devices, checked to exist here (before any weights are loaded)."""
    import torch

    devices = [torch.device(name) for name in parse_devices(spec)]
    cuda = [d for d in devices if d.type == "cuda"]
    if cuda:
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(f"device {spec!r} requested but CUDA is not available")
        count = torch.cuda.device_count()
        missing = [str(d) for d in cuda if (d.index or 0) >= count]
        if missing:
            raise DeviceUnavailableError(
                f"{', '.join(missing)} requested but this machine has {count} GPU(s)"
            )
    if any(d.type == "mps" for d in devices) and not torch.backends.mps.is_available():
        raise DeviceUnavailableError("device 'mps' requested but MPS is not available")
    return devices


def shard(items: Sequence[T], n: int) -> list[list[T]]:
    """Round-robin shares for n devices; empty shares are dropped.

    Batches arrive sorted by length, so round robin gives every device a similar mix.
    """
    shares = [list(items[i::n]) for i in range(n)]
    return [s for s in shares if s]


def on_device(device: torch.device) -> AbstractContextManager[Any]:
    """Make `device` current in this thread (cuBLAS handles, streams, caching allocator)."""
    import torch

    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


class _Stopped(Exception):
    """Raised inside a replica's thread when the run is being abandoned."""


def run_parallel(
    devices: Sequence[torch.device],
    work: Sequence[Callable[[Callable[[], None]], R]],
    tick: Callable[[int, int], None],
    total: int,
) -> list[R]:
    """Run work[i] on devices[i] in parallel; returns their results in order.

    Every work item calls `step()` after each unit of work (one batch, one block); `tick`
    gets (units done, `total`) in the calling thread and may raise (cancellation), which
    stops every replica at its next step and re-raises here. An error in any replica
    stops the others the same way and is re-raised.
    """
    if len(work) == 1:  # no threads: the one-device path stays exactly as it was
        done = 0

        def step() -> None:
            nonlocal done
            done += 1
            tick(done, total)

        with on_device(devices[0]):
            return [work[0](step)]

    finished: queue.Queue[int] = queue.Queue()
    stop = threading.Event()

    def one_step() -> None:
        if stop.is_set():
            raise _Stopped
        finished.put(1)

    def run(index: int) -> R:
        try:
            with on_device(devices[index]):
                return work[index](one_step)
        except BaseException:
            stop.set()
            raise
        finally:
            finished.put(0)  # wakes the caller

    with ThreadPoolExecutor(len(work), thread_name_prefix="hcnr-replica") as pool:
        futures = [pool.submit(run, i) for i in range(len(work))]
        done, running = 0, len(work)
        try:
            while running:
                if finished.get():
                    done += 1
                    tick(done, total)
                else:
                    running -= 1
        except BaseException:
            stop.set()
            raise
        errors = [e for e in (f.exception() for f in futures) if e is not None]
        if errors:  # the replica that failed, not the ones it stopped
            raise next((e for e in errors if not isinstance(e, _Stopped)), errors[0])
        return [f.result() for f in futures]
