"""Where a reconstruction runs: one GPU per running job (or the CPU), and ZeroGPU on Spaces.

Nothing here initialises CUDA: counting GPUs goes through NVML, and the pipeline touches the GPU
only inside a job. That keeps `python app.py --help` working without a GPU and keeps ZeroGPU,
which forbids CUDA outside its decorated calls, happy.

``PHOTO3D_GPUS=N`` makes the app use only the first N GPUs (``CUDA_VISIBLE_DEVICES`` picks which),
and 0 the CPU, e.g. to leave GPUs to other work or to check the pool with one GPU.
"""

from __future__ import annotations

import contextvars
import importlib.util
import os
import queue
import sys
import threading
from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager, Iterator, List

from pipeline.capture import Capture
from pipeline.config import ReconstructionConfig
from pipeline.memory import free_memory
from pipeline.reconstruct import reconstruct


def on_zero_gpu() -> bool:
    """A Hugging Face ZeroGPU Space: the `spaces` package is there and the platform says so."""
    return bool(os.environ.get("SPACES_ZERO_GPU")) and importlib.util.find_spec("spaces") is not None


GPUS_VARIABLE = "PHOTO3D_GPUS"


def gpu_count() -> int:
    """The GPUs the app uses: those visible, or the first ``PHOTO3D_GPUS`` of them."""
    if on_zero_gpu():
        return 1  # ZeroGPU attaches one GPU to each decorated call
    import torch  # noqa: PLC0415 (torch loads slowly; the --help path never needs it)

    visible = torch.cuda.device_count()  # via NVML: does not initialise CUDA
    wanted = os.environ.get(GPUS_VARIABLE, "").strip()
    if not wanted:
        return visible
    if not wanted.isdigit():
        print(f"warning: {GPUS_VARIABLE}={wanted!r} is not a number of GPUs; using all {visible}", file=sys.stderr)
        return visible
    if int(wanted) > visible:
        print(f"warning: {GPUS_VARIABLE}={wanted} but {visible} GPU(s) visible; using {visible}", file=sys.stderr)
    return min(int(wanted), visible)


def bind_thread(device: str) -> ContextManager:
    """Make ``device`` ("cuda:N") this thread's current CUDA device while the context lasts.

    The pipeline puts its tensors on the device it is given, but whatever uses the current
    device (nvdiffrast's context, `torch.cuda.synchronize()`, the cache it empties) would
    otherwise land on GPU 0 for every job. The current device is per thread, and each job has
    a thread of its own. "cpu" and a bare "cuda" (ZeroGPU, where CUDA must not be touched
    before the decorated call) are left alone.
    """
    if not device.startswith("cuda:"):
        return nullcontext()
    import torch  # noqa: PLC0415

    return torch.cuda.device(torch.device(device))


class DevicePool:
    """Hands each job a device: the least busy GPU, or the CPU when there is none.

    With the queue's concurrency limit equal to the number of GPUs, every job gets a GPU of its
    own. A job stopped mid-step keeps its GPU until the pipeline notices, so picking the least
    busy device (rather than blocking on a free one) never stalls the next job.
    """

    def __init__(self, devices: List[str]):
        self._busy = {device: 0 for device in devices}
        self._lock = threading.Lock()

    @classmethod
    def detect(cls) -> "DevicePool":
        count = gpu_count()
        if on_zero_gpu():
            return cls(["cuda"])
        return cls([f"cuda:{i}" for i in range(count)] or ["cpu"])

    @property
    def size(self) -> int:
        return len(self._busy)

    @property
    def on_gpu(self) -> bool:
        return "cpu" not in self._busy

    @contextmanager
    def acquire(self) -> Iterator[str]:
        with self._lock:
            device = min(self._busy, key=self._busy.get)
            self._busy[device] += 1
        try:
            yield device
        finally:
            with self._lock:
                self._busy[device] -= 1


def gpu_seconds(capture: Capture, config: ReconstructionConfig) -> int:
    """How long to reserve a ZeroGPU for one run: generous, since running out kills the job.

    Fixed work (hull, unwrap, export) plus each refine step, which grows with the views per step
    and the render size: about 0.23 ms per view at 400-512 px measured on the H200
    (docs/BENCHMARKS.md), reserved at about ten times that.
    """
    pixels = (config.refine.render_resolution / 512) ** 2
    per_step = 0.003 * config.refine.views_per_step * max(pixels, 0.25)
    fixed = 30 + len(capture) * 0.2 + config.refine.texture_size / 256
    return int(fixed + config.refine.iterations * per_step) + 30


def pipeline_runner() -> Callable:
    """`reconstruct`, or on ZeroGPU the same generator inside ``@spaces.GPU`` with a duration
    estimated from the capture and the settings."""
    if not on_zero_gpu():
        return reconstruct
    import spaces  # noqa: PLC0415 (only on Hugging Face Spaces)

    def duration(capture, config, *args, **kwargs) -> int:
        return gpu_seconds(capture, config)

    return spaces.GPU(duration=duration)(reconstruct)


_FINISHED = object()
_WAKE = object()  # put by `interrupt`: the handler yields at once instead of at the next beat


class PipelineWorker:
    """Runs the pipeline generator in a thread and hands its events over in batches.

    The page must hear from a job at least every couple of seconds (progress, and so that Stop,
    which gradio applies between two yields, takes effect), but the pipeline is silent during
    long steps. Reading from a queue with a timeout gives the handler a beat to yield on.
    """

    def __init__(self, run: Callable, pool: DevicePool, *args, **kwargs):
        self._events: "queue.Queue[object]" = queue.Queue()
        self._run, self._pool, self._args, self._kwargs = run, pool, args, kwargs
        # A copy of the caller's context: ZeroGPU finds the request (and its quota) there.
        context = contextvars.copy_context()
        self.thread = threading.Thread(target=context.run, args=(self._work,), name="photo3d-job", daemon=True)

    def start(self) -> "PipelineWorker":
        self.thread.start()
        return self

    def _work(self) -> None:
        try:
            with self._pool.acquire() as device, bind_thread(device):
                for event in self._run(*self._args, device=device, **self._kwargs):
                    self._events.put(event)
        except Exception as error:  # handed to the handler, which reports it to the user
            self._events.put(error)
        finally:
            self._args = self._kwargs = None  # the capture: the handler holds no other reference
            free_memory()
            self._events.put(_FINISHED)

    def interrupt(self) -> None:
        """Wake `batches` now (after Stop), so the handler returns within milliseconds rather
        than a beat: gradio's cancel of the job waits for the handler's current step."""
        self._events.put(_WAKE)

    def batches(self, beat_s: float) -> Iterator[list]:
        """Lists of pipeline events, one at least every ``beat_s`` seconds (empty when there was
        nothing new), until the pipeline finishes; re-raises its exception."""
        while True:
            try:
                batch = [self._events.get(timeout=beat_s)]
            except queue.Empty:
                yield []
                continue
            while not self._events.empty():
                batch.append(self._events.get_nowait())
            events = [item for item in batch
                      if item is not _FINISHED and item is not _WAKE and not isinstance(item, Exception)]
            errors = [item for item in batch if isinstance(item, Exception)]
            if events or _WAKE in batch:
                yield events
            if errors:
                raise errors[0]
            if _FINISHED in batch:
                return
