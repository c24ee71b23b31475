"""The app's device pool: one job per GPU, each job's thread bound to its GPU (GPU count mocked)."""

import threading
from contextlib import contextmanager

import pytest
import torch

from ui import devices
from ui.devices import DevicePool, PipelineWorker


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    monkeypatch.delenv(devices.GPUS_VARIABLE, raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def _first_events(worker: PipelineWorker) -> list:
    return [event for batch in worker.batches(0.05) for event in batch]


def test_two_concurrent_jobs_get_two_gpus_each_bound_to_its_thread(two_gpus, monkeypatch):
    bound = []  # (thread id, device) as bind_thread saw them

    @contextmanager
    def record_binding(device):
        bound.append((threading.get_ident(), device))
        yield

    monkeypatch.setattr(devices, "bind_thread", record_binding)
    pool = DevicePool.detect()
    assert pool.size == 2 and pool.on_gpu
    both_running = threading.Barrier(2, timeout=10)

    def job(name, device):
        both_running.wait()  # neither finishes before the other holds its device
        yield name, device, threading.get_ident()

    workers = [PipelineWorker(job, pool, name).start() for name in ("a", "b")]
    (a,), (b,) = (_first_events(w) for w in workers)
    assert {a[1], b[1]} == {"cuda:0", "cuda:1"}
    assert sorted(bound) == sorted([(a[2], a[1]), (b[2], b[1])])  # each in its own job's thread


def test_gpu_count_can_be_forced(two_gpus, monkeypatch, capsys):
    for value, devices_used in [("1", ["cuda:0"]), ("0", ["cpu"]), ("2", ["cuda:0", "cuda:1"])]:
        monkeypatch.setenv(devices.GPUS_VARIABLE, value)
        pool = DevicePool.detect()
        with pool.acquire() as first, pool.acquire() as second:
            assert sorted({first, second}) == devices_used
    monkeypatch.setenv(devices.GPUS_VARIABLE, "4")
    assert devices.gpu_count() == 2 and "PHOTO3D_GPUS=4 but 2 GPU(s) visible" in capsys.readouterr().err
    monkeypatch.setenv(devices.GPUS_VARIABLE, "all")
    assert devices.gpu_count() == 2 and "not a number" in capsys.readouterr().err


def test_bind_thread_sets_the_current_cuda_device_only_for_an_indexed_gpu():
    binding = devices.bind_thread("cuda:1")
    assert isinstance(binding, torch.cuda.device) and binding.idx == 1  # entered only on a GPU machine
    assert not isinstance(devices.bind_thread("cuda"), torch.cuda.device)  # ZeroGPU: no CUDA before its call
    assert not isinstance(devices.bind_thread("cpu"), torch.cuda.device)
