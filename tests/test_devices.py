"""Device lists and data parallelism: a replica per device gives the one-device repair."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from hcnr_cli.main import app
from hcnr_core import RepairConfig
from hcnr_core.config import RunOptions, split_run_options
from hcnr_core.devices import (
    DeviceUnavailableError,
    parse_devices,
    resolve_devices,
    run_parallel,
    shard,
)
from hcnr_core.errors import RepairCancelled
from hcnr_core.pipeline import RepairPipeline
from hcnr_core.scoring import InputHessians
from tests.toy_cli import repair_argv

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("cpu", ["cpu"]),
        ("cuda", ["cuda"]),
        ("cuda:1", ["cuda:1"]),
        ("mps", ["mps"]),
        ("cuda:0,cuda:1", ["cuda:0", "cuda:1"]),
        (" cuda:0 , cuda:3 ", ["cuda:0", "cuda:3"]),
        ("cpu,cpu", ["cpu", "cpu"]),
        ("cuda:0,cpu", ["cuda:0", "cpu"]),
    ],
)
def test_parse_devices_accepts(spec: str, expected: list[str]):
    assert parse_devices(spec) == expected
    assert RunOptions(device=spec).device == ",".join(expected)


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("gpu", "unknown device"),
        ("", "unknown device"),
        ("cuda:0,", "unknown device"),
        ("cuda:-1", "unknown device"),
        ("cuda:0,cuda:0", "appears twice"),
        ("cuda,cuda:1", "by index"),
        ("mps,cpu", "mps cannot"),
        ("cuda:0;rm -rf", "unknown device"),
    ],
)
def test_parse_devices_refuses(spec: str, reason: str):
    with pytest.raises(ValueError, match=reason):
        parse_devices(spec)
    with pytest.raises(ValueError, match=reason):
        RunOptions(device=spec)


def test_resolve_devices_refuses_missing_gpus():
    assert resolve_devices("cpu,cpu") == [CPU, CPU]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(DeviceUnavailableError) as caught:
        resolve_devices(f"cuda:{count}")
    assert caught.value.code == "device_unavailable"


def test_cli_refuses_missing_gpu_before_reading_data(toy, tmp_path: Path):
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    argv = repair_argv(toy, tmp_path / "out", f"--device=cuda:{count}")
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert f"cuda:{count}" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("n_items", "n_devices"), [(7, 2), (2, 3), (8, 4), (1, 1)])
def test_shard_is_round_robin_and_complete(n_items: int, n_devices: int):
    shares = shard(list(range(n_items)), n_devices)
    assert sorted(x for share in shares for x in share) == list(range(n_items))
    assert len(shares) == min(n_items, n_devices)
    assert all(share == list(range(i, n_items, n_devices)) for i, share in enumerate(shares))


def _counting_work(n_steps: int, seen: list[int], delay: float = 0.0):
    def run(step) -> int:
        for _ in range(n_steps):
            time.sleep(delay)
            seen.append(threading.get_ident())
            step()
        return n_steps

    return run


def test_run_parallel_returns_in_order_and_ticks_every_step():
    seen: list[int] = []
    ticks: list[tuple[int, int]] = []
    # Every replica waits for the others before its first step: the run completes only if
    # the three run at the same time, each in a thread of its own (not on thread ids
    # alone, which a pool may reuse once a quick replica is done).
    together = threading.Barrier(3, timeout=60)

    def replica(n: int):
        count = _counting_work(n, seen)

        def run(step) -> int:
            together.wait()
            return count(step)

        return run

    results = run_parallel(
        [CPU] * 3, [replica(n) for n in (3, 5, 1)], lambda d, t: ticks.append((d, t)), 9
    )
    assert results == [3, 5, 1]
    assert ticks == [(i, 9) for i in range(1, 10)]
    assert len(set(seen)) == 3  # one thread per replica
    assert threading.get_ident() not in seen


def _until_stopped(stopped: list[str], name: str, ready: threading.Event | None = None):
    """A replica that steps until run_parallel stops it (or 60 s pass, which the tests
    read as "never stopped"); `ready` is set after its first step. Whether it is stopped
    does not depend on how fast the threads are scheduled, only on the stop itself."""

    def run(step) -> str:
        deadline = time.monotonic() + 60
        first = True
        while time.monotonic() < deadline:
            try:
                step()
            except BaseException:
                stopped.append(name)
                raise
            if first and ready is not None:
                ready.set()
            first = False
            time.sleep(0.001)
        return "ran to the deadline"

    return run


def test_run_parallel_stops_everyone_when_a_replica_fails():
    stopped: list[str] = []
    healthy_started = threading.Event()

    def broken(step) -> None:
        step()
        assert healthy_started.wait(60)  # fail only once the other one is running
        raise RuntimeError("replica 1 ran out of memory")

    work = [_until_stopped(stopped, "healthy", healthy_started), broken]
    with pytest.raises(RuntimeError, match="out of memory"):
        run_parallel([CPU, CPU], work, lambda d, t: None, 10**9)
    assert stopped == ["healthy"]  # stopped at a step, not left to run to its end


def test_run_parallel_cancellation_from_the_caller_stops_replicas():
    stopped: list[str] = []
    ticks: list[int] = []

    def tick(done: int, _total: int) -> None:
        ticks.append(done)
        if done >= 5:
            raise RepairCancelled("cancelled")

    work = [_until_stopped(stopped, name) for name in ("a", "b")]
    with pytest.raises(RepairCancelled):
        run_parallel([CPU, CPU], work, tick, 10**9)
    assert ticks == [1, 2, 3, 4, 5]  # no tick after the one that raised
    assert sorted(stopped) == ["a", "b"]  # both stopped, neither ran to its end


def test_hessians_of_different_groups_do_not_combine(toy):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(toy["base"])
    a = InputHessians(model, ["model.layers.0.self_attn.q_proj"])
    b = InputHessians(model, ["model.layers.1.self_attn.q_proj"])
    ids = torch.tensor([[2, 10, 11, 12, 13]])
    for hessians in (a, b):  # a batch each: their groups are discovered, not set here
        hessians.add_batch(ids, torch.ones_like(ids))
    with pytest.raises(ValueError, match="different module groups"):
        a.absorb(b)
    same = InputHessians(model, ["model.layers.0.self_attn.q_proj"])
    same.add_batch(ids, torch.ones_like(ids))
    assert a.absorb(same).n_tokens == 10  # the same modules do combine


def _repair(toy, out: Path, kind: str, **values) -> tuple[dict, list[float]]:
    fractions: list[float] = []
    cfg, options = split_run_options(values)
    pipeline = RepairPipeline(
        RepairConfig(**cfg), RunOptions(**options), progress=lambda e: fractions.append(e.fraction)
    )
    prepared = pipeline.prepare(toy["base"], toy[kind], toy["honesty"], toy["task"])
    return pipeline.run(prepared, out), fractions


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """‖got − expected‖ / ‖expected‖ (0 for two zero tensors)."""
    scale = float(expected.float().norm())
    return float((got.float() - expected.float()).norm()) / scale if scale else 0.0


CASES = [
    ("adapter", False, "paper"),
    ("full", False, "exact"),
    ("adapter", False, "task_aware"),
    ("adapter", True, "paper"),
    ("full", True, "exact"),
]


@pytest.mark.parametrize(("kind", "layerwise", "compensation"), CASES)
def test_two_replicas_repair_like_one_device(toy, tmp_path: Path, kind, layerwise, compensation):
    cfg = {"layerwise": layerwise, "compensation": compensation, "batch_size": 4}
    one, _ = _repair(toy, tmp_path / "one", kind, device="cpu", **cfg)
    two, fractions = _repair(toy, tmp_path / "two", kind, device="cpu,cpu", **cfg)
    assert two["config"]["device"] == "cpu,cpu"
    assert two["selected_matrices"] == one["selected_matrices"]
    for loss in ("honesty_on_base", "task_on_finetuned"):
        assert two["fisher_mean_loss"][loss] == pytest.approx(one["fisher_mean_loss"][loss])
    a = load_file(tmp_path / "one" / "model-00001-of-00001.safetensors")
    b = load_file(tmp_path / "two" / "model-00001-of-00001.safetensors")
    assert set(a) == set(b)
    for name in a:
        assert torch.isfinite(b[name]).all()
        # Sums are added in another order, and H⁻¹ amplifies the last bits: compare whole
        # tensors, not elements near zero.
        assert relative_error(b[name], a[name]) < 1e-5, name
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    # Loading patches torch.nn.init process-wide; replicas must leave it as they found it.
    probe = torch.zeros(8)
    torch.nn.init.normal_(probe)
    assert probe.abs().sum() > 0


def test_two_replicas_can_be_cancelled(toy, tmp_path: Path):
    calls = 0

    def should_cancel() -> bool:
        nonlocal calls
        calls += 1
        return calls > 6  # during the first Fisher pass

    pipeline = RepairPipeline(
        RepairConfig(batch_size=2), RunOptions(device="cpu,cpu"), should_cancel=should_cancel
    )
    prepared = pipeline.prepare(toy["base"], toy["adapter"], toy["honesty"], toy["task"])
    with pytest.raises(RepairCancelled, match="fisher_task"):
        pipeline.run(prepared, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
def test_gpu_replicas_repair_like_the_cpu(toy, tmp_path: Path):
    """A GPU plus the CPU (or two GPUs when there are): placement across real devices."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    devices = "cuda:0,cuda:1" if torch.cuda.device_count() > 1 else "cuda:0,cpu"
    cfg = {"compensation": "exact", "batch_size": 4, "dtype": "float32"}
    one, _ = _repair(toy, tmp_path / "one", "adapter", device="cpu", **cfg)
    for layerwise in (False, True):
        out = tmp_path / f"gpu-{layerwise}"
        got, _ = _repair(toy, out, "adapter", device=devices, layerwise=layerwise, **cfg)
        assert got["selected_matrices"] == one["selected_matrices"]
        a = load_file(tmp_path / "one" / "model-00001-of-00001.safetensors")
        b = load_file(out / "model-00001-of-00001.safetensors")
        for name in a:
            assert relative_error(b[name], a[name]) < 1e-4, name
