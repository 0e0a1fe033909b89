"""Validation that cannot run away: a child process with a wall-clock limit and rlimits.

    warnings = validate_bounded("hcnr", config, inputs, limits)

runs `validate_inputs` (the method's own `check`: checkpoints, chat template,
tokenization, the meta model; plus the data limits) in a child forked from a
forkserver that has torch and transformers imported already. The child gets
RLIMIT_AS (`validation_memory_mb`), RLIMIT_CPU (the time limit + 5 s) and a lower CPU
priority; the parent kills it at `validation_timeout_seconds` (`validation_timeout`).
Errors come back with their class, message and attributes, so callers see the same
`HCNRError` (or jinja `TemplateError`) as an in-process check would raise. At most
`max_concurrent_validations` children run at once per process; waiting for a slot counts
towards the time limit. Nothing is written: validation only reads.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import math
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing import forkserver, popen_forkserver, reduction, spawn, util
from multiprocessing.context import ForkServerProcess, set_spawning_popen
from pathlib import Path
from typing import Any

from hcnr_core.errors import HCNRError, ValidationMemoryError, ValidationTimeoutError
from hcnr_core.limits import Limits, check_data, current_limits, use_limits

PRELOAD = ["hcnr_core.bounded_preload"]
CPU_GRACE_SECONDS = 5
CHILD_NICE = 10

_lock = threading.Lock()
_context: Any = None
_slots: dict[int, threading.BoundedSemaphore] = {}
_children: set[Any] = set()
_warm_lock = threading.Lock()
_warmed: set[int | None] = set()  # forkservers (pids) known to fork children


class _Popen(popen_forkserver.Popen):
    """The forkserver's Popen, minus re-running the parent's __main__ in the child (a
    script without a main guard, a test runner): the child needs only our code."""

    def _launch(self, process_obj: Any) -> None:
        prep_data = spawn.get_preparation_data(process_obj._name)
        for key in ("init_main_from_path", "init_main_from_name"):
            prep_data.pop(key, None)
        buf = io.BytesIO()
        set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            set_spawning_popen(None)
        self.sentinel, w = forkserver.connect_to_new_process(self._fds)
        parent_w = os.dup(w)
        self.finalizer = util.Finalize(self, util.close_fds, (parent_w, self.sentinel))
        with open(w, "wb", closefd=True) as handle:
            handle.write(buf.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)


class _BoundedProcess(ForkServerProcess):
    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        return _Popen(process_obj)


def _mp_context() -> Any:
    global _context
    with _lock:
        if _context is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(PRELOAD)
            _context = context
        return _context


def _noop() -> None:
    return None


def warm_up() -> None:
    """Start the forkserver now (it imports torch once), not on the first validation.
    Returns once it forks children: `ensure_running` returns while the forkserver is
    still importing, and a first validation would otherwise spend its time limit
    waiting for that (16 s of an 8 s limit on a loaded 2-core machine)."""
    _mp_context()
    with _warm_lock:
        forkserver.ensure_running()
        server = getattr(forkserver, "_forkserver", None)
        pid = getattr(server, "_forkserver_pid", None)
        if pid is not None and pid in _warmed:
            return
        process = _BoundedProcess(target=_noop, daemon=True)
        process.start()  # blocks until the forkserver has imported PRELOAD
        process.join()
        _warmed.add(pid)


def _slot(limits: Limits) -> threading.BoundedSemaphore:
    with _lock:
        n = limits.max_concurrent_validations
        if n not in _slots:
            _slots[n] = threading.BoundedSemaphore(n)
        return _slots[n]


def stop_children() -> None:
    """Kill every validation child still running (a server shutting down)."""
    with _lock:
        children = list(_children)
    for process in children:
        with contextlib.suppress(Exception):
            process.kill()


# --- what the child runs -------------------------------------------------------------------


def validate_inputs(method: str, config: Any, inputs: Any, options: Any = None) -> list[str]:
    """Every check of `method` that needs no weights (with its `RunOptions`: layer by
    layer needs a Llama-like layout), plus the data limits (bytes, samples, tokens) for
    methods whose `check` does not apply them itself (HCNR's `prepare` does). Returns the
    warnings."""
    from hcnr_core.registry import get_method

    limits = current_limits()
    paths = {
        name: getattr(inputs, name)
        for name in ("honesty", "task", "validation")
        if isinstance(getattr(inputs, name), (str, Path))
    }
    from hcnr_core.limits import check_data_bytes

    check_data_bytes(paths, limits)
    warnings = list(get_method(method).check(config, inputs, options))
    if method != "hcnr":
        _check_other_data(inputs, limits)
    return warnings


def _check_other_data(inputs: Any, limits: Limits) -> None:
    from hcnr_core.checkpoint import inspect_checkpoint, load_tokenizer
    from hcnr_core.data import load_jsonl

    infos = [inspect_checkpoint(inputs.finetuned)]
    if inputs.base is not None:
        infos.append(inspect_checkpoint(inputs.base))
    tokenizer = load_tokenizer(*[i for i in infos if i.has_tokenizer] or infos)
    sets = {
        name: list(load_jsonl(value) if isinstance(value, (str, Path)) else value)
        for name in ("honesty", "task", "validation")
        if (value := getattr(inputs, name)) is not None
    }
    check_data(tokenizer, sets, None, limits)


def _set_rlimits(limits: Limits) -> None:
    import resource

    cpu = math.ceil(limits.validation_timeout_seconds) + CPU_GRACE_SECONDS
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
    if limits.validation_memory_mb > 0:
        memory = limits.validation_memory_mb * 1024 * 1024
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    with contextlib.suppress(OSError):
        os.nice(CHILD_NICE)


def _encode_error(exc: BaseException) -> dict[str, Any]:
    state = {}
    for key, value in vars(exc).items():
        try:
            import pickle

            pickle.dumps(value)
            state[key] = value
        except Exception:
            continue
    return {
        "module": type(exc).__module__,
        "name": type(exc).__qualname__,
        "message": str(exc),
        "state": state,
    }


def _child(connection: Any, fn: Any, args: tuple, limits: Limits) -> None:
    signal.signal(signal.SIGXCPU, signal.SIG_DFL)
    _set_rlimits(limits)
    with contextlib.suppress(Exception):
        import torch

        torch.set_num_threads(1)
    try:
        with use_limits(limits):
            result = fn(*args)
        connection.send(("ok", result))
    except MemoryError:
        connection.send(("memory", None))
    except BaseException as exc:  # the parent re-raises it
        connection.send(("error", _encode_error(exc)))
    finally:
        connection.close()


def _decode_error(data: dict[str, Any]) -> BaseException:
    """The child's exception, rebuilt without calling its __init__ (some take extra
    arguments); only exception classes are rebuilt, anything else is an HCNRError."""
    try:
        cls = getattr(importlib.import_module(data["module"]), data["name"])
        if not (isinstance(cls, type) and issubclass(cls, Exception)):
            raise TypeError(data["name"])
        exc = cls.__new__(cls)
        Exception.__init__(exc, data["message"])
        exc.__dict__.update(data["state"])
        return exc
    except Exception:
        return HCNRError(f"{data['name']}: {data['message']}")


# --- the parent ---------------------------------------------------------------------------


def run_bounded(fn: Any, args: tuple, limits: Limits | None = None, *, fork: bool = False) -> Any:
    """fn(*args) in a child process under `limits` (see the module's docstring);
    in this process, unbounded, when `validation_isolation` is off. `fork`: fork this
    process instead of asking the forkserver (no second torch import), for a
    single-threaded caller that has run no torch work yet (the CLI)."""
    limits = limits or current_limits()
    if not limits.validation_isolation:
        with use_limits(limits):
            return fn(*args)
    if fork:  # what the child needs, imported once here (the run needs it next anyway)
        for module in PRELOAD:
            importlib.import_module(module)
    else:
        warm_up()  # the forkserver's start (importing torch) does not count
    timeout = limits.validation_timeout_seconds
    deadline = time.monotonic() + timeout
    slot = _slot(limits)
    if not slot.acquire(timeout=timeout):
        raise ValidationTimeoutError(
            f"no validation slot became free within {timeout:g} s "
            f"({limits.max_concurrent_validations} run at once); try again later",
            limit="validation_timeout_seconds",
            value=timeout,
            allowed=timeout,
        )
    try:
        return _run_child(fn, args, limits, deadline, fork)
    finally:
        slot.release()


def _run_child(fn: Any, args: tuple, limits: Limits, deadline: float, fork: bool) -> Any:
    context = multiprocessing.get_context("fork") if fork else _mp_context()
    receiver, sender = context.Pipe(duplex=False)
    kind = context.Process if fork else _BoundedProcess
    process = kind(target=_child, args=(sender, fn, args, limits), daemon=True)
    started = time.monotonic()
    process.start()
    sender.close()
    with _lock:
        _children.add(process)
    try:
        remaining = max(0.0, deadline - time.monotonic())
        if not receiver.poll(remaining):
            process.kill()
            elapsed = time.monotonic() - started
            raise ValidationTimeoutError(
                f"the validation ran past its {limits.validation_timeout_seconds:g}-second "
                f"limit (stopped after {elapsed:.1f} s): the chat template, the tokenizer "
                "or the model config demand too much work",
                limit="validation_timeout_seconds",
                value=round(elapsed, 3),
                allowed=limits.validation_timeout_seconds,
            )
        try:
            kind, payload = receiver.recv()
        except (EOFError, OSError):
            process.join(5)
            raise _died(process.exitcode, limits) from None
    finally:
        receiver.close()
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join(5)
        with _lock:
            _children.discard(process)
    if kind == "ok":
        return payload
    if kind == "memory":
        raise _memory_error(limits)
    raise _decode_error(payload)


def _memory_error(limits: Limits) -> ValidationMemoryError:
    return ValidationMemoryError(
        f"the validation needed more than {limits.validation_memory_mb} MiB",
        limit="validation_memory_mb",
        allowed=limits.validation_memory_mb,
    )


def _died(exitcode: int | None, limits: Limits) -> HCNRError:
    if exitcode in (-signal.SIGXCPU, -signal.SIGKILL):
        return ValidationTimeoutError(
            "the validation ran past its CPU-time limit "
            f"({math.ceil(limits.validation_timeout_seconds) + CPU_GRACE_SECONDS} s)",
            limit="validation_timeout_seconds",
            allowed=limits.validation_timeout_seconds,
        )
    if exitcode in (-signal.SIGSEGV, -signal.SIGABRT, -signal.SIGBUS):
        return _memory_error(limits)
    return HCNRError(f"the validation process died (exit code {exitcode})")


def validate_bounded(
    method: str,
    config: Any,
    inputs: Any,
    limits: Limits | None = None,
    *,
    fork: bool = False,
    options: Any = None,
) -> Any:
    """`validate_inputs` under the limits: the warnings, or the check's error."""
    return run_bounded(validate_inputs, (method, config, inputs, options), limits, fork=fork)
