"""Many captures at once: `python -m pipeline batch CAPTURES_DIR -o OUT_DIR`, on Ray.

Every sub-folder (or ``.zip``) of CAPTURES_DIR is one capture and one Ray task, so the same command
runs on one laptop (Ray started locally) and on a cluster (``--address``). A task reserves
``gpus_per_job`` GPUs (Ray shows it only those: ``cuda:0`` is its own) and runs on the CPU when the
cluster has no GPU. A task is a thin consumer of `reconstruct`'s events: it sends back a manifest
row and the output files, which the driver writes under OUT_DIR/NAME/ (so only the captures need
to be readable from every node, at the same path) and records in OUT_DIR/manifest.jsonl.

The manifest has one JSON row per capture: ``capture``, ``status`` ("ok" / "failed"), ``glb``
(relative to OUT_DIR), ``error`` (the pipeline's message), ``metrics``, ``seconds``, ``host``,
``gpu`` (Ray's GPU ids on that host, None on a CPU), and ``warnings``, ``timings``, ``started`` /
``finished`` (Unix time), ``fingerprint`` (of the input). A row is appended as soon as its capture
ends, so a crash or Ctrl-C loses only the captures in flight; the file is rewritten (atomically)
with one row per capture at the start and the end of a run. Re-running skips captures whose row is
"ok" and whose GLB exists, and failed captures whose input has not changed since (``retry_failed``
runs them again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .config import ReconstructionConfig
from .errors import PipelineError
from .limits import MiB

MANIFEST_NAME = "manifest.jsonl"
INSTALL_RAY = "pip install -r requirements-batch.txt"
# Ray's shared memory in local mode: results are a few MB of GLB/zip each and are freed as soon as
# the driver has written them; Ray's default (30% of RAM) would reserve gigabytes of /dev/shm.
LOCAL_OBJECT_STORE_BYTES = 256 * MiB
# After Ctrl-C: how long the cancelled tasks get to unwind (free the GPU, stop the UV child).
CANCEL_GRACE_S = 10.0
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


@dataclass(frozen=True)
class CaptureEntry:
    """One capture of the batch: its name (the folder's, or the zip's stem), where it is, and a
    fingerprint of its files (names, sizes, modification times) to notice a fixed capture."""

    name: str
    path: Path
    fingerprint: str


def import_ray():
    """The ray module, or a PipelineError saying how to install it (it is an optional dependency)."""
    try:
        import ray  # noqa: PLC0415
    except ImportError:
        raise PipelineError(f"the batch runner needs Ray, which is not installed: {INSTALL_RAY}") from None
    return ray


def fingerprint(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha1()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def find_captures(captures_dir: Path, skip: Optional[Path] = None) -> List[CaptureEntry]:
    """Every non-hidden sub-folder and ``.zip`` of ``captures_dir``, by name (``skip``: a folder to
    leave out, the output folder when it sits inside). Raises PipelineError when there are none or
    when two would get the same name."""
    if not captures_dir.is_dir():
        raise PipelineError(f"{captures_dir} is not a folder: pass a folder that holds one sub-folder (or .zip) per capture")
    skip = skip.resolve() if skip is not None else None
    entries: Dict[str, CaptureEntry] = {}
    for path in sorted(captures_dir.iterdir()):
        if path.name.startswith(".") or path.resolve() == skip:
            continue
        if not (path.is_dir() or (path.is_file() and path.suffix.lower() == ".zip")):
            continue
        name = path.name if path.is_dir() else path.stem
        if name in entries:
            raise PipelineError(f"{entries[name].path.name} and {path.name} would both be capture {name!r}: "
                                "rename or remove one")
        entries[name] = CaptureEntry(name, path, fingerprint(path))
    if not entries:
        raise PipelineError(f"no captures in {captures_dir}: put each capture in a sub-folder (or a .zip) of it")
    return list(entries.values())


def read_manifest(path: Path) -> Dict[str, dict]:
    """capture name -> its latest row. A line cut short by a crash mid-write is ignored."""
    rows: Dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "capture" in row:
                rows[row["capture"]] = row
    return rows


def write_manifest(path: Path, rows: Dict[str, dict]) -> None:
    """One row per capture, replacing the file atomically."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(json.dumps(row) + "\n" for row in rows.values()))
    os.replace(temporary, path)


def append_row(path: Path, row: dict) -> None:
    with path.open("a") as file:
        file.write(json.dumps(row) + "\n")
        file.flush()
        os.fsync(file.fileno())


def is_done(row: Optional[dict], out_dir: Path) -> bool:
    return row is not None and row.get("status") == "ok" and bool(row.get("glb")) and (out_dir / row["glb"]).is_file()


def to_run(captures: List[CaptureEntry], rows: Dict[str, dict], out_dir: Path, retry_failed: bool) -> List[CaptureEntry]:
    """The captures a run must do: not done, and not failed before on the same input (unless ``retry_failed``)."""
    def failed_unchanged(entry: CaptureEntry) -> bool:
        row = rows.get(entry.name)
        return row is not None and row.get("status") == "failed" and row.get("fingerprint") == entry.fingerprint

    return [e for e in captures if not is_done(rows.get(e.name), out_dir) and (retry_failed or not failed_unchanged(e))]


def new_row(entry: CaptureEntry, **values) -> dict:
    """A manifest row for ``entry``: "failed" with nothing known, updated with ``values``."""
    row = {"capture": entry.name, "status": "failed", "glb": None, "error": None, "metrics": {}, "seconds": None,
           "host": None, "gpu": None, "warnings": [], "timings": {}, "started": None, "finished": None,
           "fingerprint": entry.fingerprint}
    row.update(values)
    return row


def run_capture(entry: CaptureEntry, config: ReconstructionConfig, gpu_ids: List[str]) -> Tuple[dict, Dict[str, bytes]]:
    """The body of one Ray task: reconstruct one capture in a temporary folder.

    ``gpu_ids``: the GPUs Ray gave the task (it sees them as cuda:0...; empty = CPU). Returns the
    manifest row and, when it succeeded, the output files by name. The pipeline's errors become a
    "failed" row; only an interruption (Ray's cancel) propagates.
    """
    started = time.time()  # a GPU task's worker is fresh: its seconds include importing torch
    from . import events  # noqa: PLC0415 (torch loads in the worker, not in the driver)
    from .importers import load_capture  # noqa: PLC0415
    from .reconstruct import reconstruct  # noqa: PLC0415

    row = new_row(entry, host=socket.gethostname(), gpu=",".join(gpu_ids) or None, started=started)
    files: Dict[str, bytes] = {}
    tidy = str
    with tempfile.TemporaryDirectory(prefix="photo3d-batch-") as work:
        try:
            source = entry.path
            if entry.path.suffix.lower() == ".zip":
                # The app's unpacker: input limits, zip bombs, links and paths outside the archive.
                from ui.uploads import sort_uploads  # noqa: PLC0415

                uploads = sort_uploads([entry.path], Path(work) / "unpacked")
                source, tidy = uploads.source, uploads.tidy
                row["warnings"] += uploads.notices
            capture = load_capture(source, max_side=config.ingest.max_image_side)
            result = None
            for event in reconstruct(capture, config, Path(work) / "out", device="cuda:0" if gpu_ids else "cpu",
                                     name=entry.name):
                if isinstance(event, events.Warning):
                    row["warnings"].append(tidy(event.message))
                elif isinstance(event, events.Result):
                    result = event
            if result is None:
                raise PipelineError("the pipeline ended without a result")
            files = {Path(p).name: Path(p).read_bytes() for p in (result.glb_path, result.zip_path, result.cameras_path)}
            row.update(status="ok", glb=f"{entry.name}/{Path(result.glb_path).name}", metrics=result.metrics,
                       timings=result.timings)
        except PipelineError as exc:
            row["error"] = tidy(str(exc))
        except Exception as exc:  # a bug or a library's crash: this capture fails, the others go on
            traceback.print_exc()  # into the Ray worker's log
            row["error"] = f"unexpected {type(exc).__name__}: {tidy(str(exc))}"
    row["finished"] = time.time()
    row["seconds"] = round(row["finished"] - started, 2)
    return row, files


def _task(entry: CaptureEntry, config: ReconstructionConfig) -> Tuple[dict, Dict[str, bytes]]:
    import ray  # noqa: PLC0415

    return run_capture(entry, config, [str(i) for i in ray.get_gpu_ids()])


START_CLUSTER = "start it with `ray start --head` (and `ray start --address HEAD:6379` on the other machines)"


def _start_ray(ray, address: Optional[str]) -> None:
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    if address is None:
        kwargs["object_store_memory"] = LOCAL_OBJECT_STORE_BYTES
    elif ":" in address and "://" not in address:  # HOST:PORT: Ray would retry a wrong one for minutes
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except (OSError, ValueError) as exc:
            raise PipelineError(f"cannot reach the Ray cluster at {address} ({exc}): check the address, or "
                                f"{START_CLUSTER}") from None
    try:
        ray.init(address=address or "local", **kwargs)
    except ConnectionError as exc:
        # Ray sends its token only to a cluster it found itself ("auto"), never to an address given.
        token = ("; a cluster with token authentication (Ray's default) also needs RAY_AUTH_MODE=token and "
                 "RAY_AUTH_TOKEN=<the head's ~/.ray/auth_token>") if address != "auto" and not os.environ.get("RAY_AUTH_MODE") else ""
        raise PipelineError(f"cannot reach the Ray cluster at {address}: {str(exc).rstrip('.')}; {START_CLUSTER}{token}") from None


def _gpus_per_task(ray, gpus_per_job: float) -> float:
    """``gpus_per_job``, or 0 (CPU tasks) when no node of the cluster has a GPU."""
    per_node = [node["Resources"].get("GPU", 0) for node in ray.nodes() if node.get("Alive")]
    most = max(per_node, default=0)
    if most == 0 or gpus_per_job == 0:
        return 0.0
    if gpus_per_job > most:
        raise PipelineError(f"--gpus-per-job {gpus_per_job:g}, but no machine of the Ray cluster has more than "
                            f"{most:g} GPU(s): lower it")
    return gpus_per_job


def _outcome(ray, ref, entry: CaptureEntry) -> Optional[Tuple[dict, Dict[str, bytes]]]:
    """A finished task's (row, files); None when it was cancelled; a "failed" row when Ray lost it."""
    try:
        return ray.get(ref)
    except ray.exceptions.TaskCancelledError:
        return None
    except ray.exceptions.RayTaskError as exc:  # our task catches Exception: this is a cancel or an exit
        if isinstance(exc.cause, KeyboardInterrupt):
            return None
        message = f"the Ray task failed: {str(exc).strip().splitlines()[0]}"
    except ray.exceptions.RayError as exc:  # the worker died (killed for memory, crashed), the node was lost
        first = str(exc).strip().splitlines()
        message = f"the Ray worker died ({type(exc).__name__}: {first[0] if first else 'no message'}); see the logs under /tmp/ray/session_latest/logs"
    return new_row(entry, error=message, finished=time.time()), {}


def _record(out_dir: Path, manifest: Path, rows: Dict[str, dict], row: dict, files: Dict[str, bytes]) -> None:
    """Write the files first, then the row: an "ok" row always has its GLB."""
    if files:
        folder = out_dir / row["capture"]
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)
    append_row(manifest, row)
    rows[row["capture"]] = row


def run_batch(captures_dir: Path, out_dir: Path, config: ReconstructionConfig, address: Optional[str] = None,
              gpus_per_job: float = 1.0, retry_failed: bool = False) -> int:
    """Reconstruct every capture of ``captures_dir`` into ``out_dir`` (see the module docstring).

    Returns the exit status: 0 when every capture is "ok", 1 when some failed, 130 after Ctrl-C
    (the tasks in flight are cancelled; finished ones are kept). Progress goes to stderr, the
    summary table to stdout.
    """
    from tqdm import tqdm  # noqa: PLC0415

    ray = import_ray()
    if gpus_per_job < 0:
        raise PipelineError(f"--gpus-per-job must be 0 or more, got {gpus_per_job:g}")
    captures_dir, out_dir = Path(captures_dir), Path(out_dir)
    captures = find_captures(captures_dir, skip=out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / MANIFEST_NAME
    rows = read_manifest(manifest)
    write_manifest(manifest, rows)  # one row per capture again after an interrupted run
    todo = to_run(captures, rows, out_dir, retry_failed)
    done_before = sum(is_done(rows.get(e.name), out_dir) for e in captures)
    failed_before = len(captures) - len(todo) - done_before
    failed_note = f", {failed_before} failed before on the same input (--retry-failed runs them again)" if failed_before else ""
    print(f"{len(captures)} captures: {done_before} done before{failed_note}, {len(todo)} to run", file=sys.stderr)
    interrupted = False
    if todo:
        try:
            _start_ray(ray, address)
            interrupted = _run_tasks(ray, tqdm, todo, config, gpus_per_job, address, out_dir, manifest, rows)
        except KeyboardInterrupt:  # while Ray was starting
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            interrupted = True
        finally:
            ray.shutdown()
    write_manifest(manifest, rows)
    print(format_summary(captures, rows))
    if interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # ignored since the Ctrl-C (see _run_tasks)
        left = len(to_run(captures, rows, out_dir, retry_failed))
        print(f"interrupted: {left} capture(s) not done; run the same command again to finish them", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0 if all(is_done(rows.get(e.name), out_dir) for e in captures) else 1


def _run_tasks(ray, tqdm, todo, config, gpus_per_job, address, out_dir, manifest, rows) -> bool:
    """Submit one task per capture and record each as it ends; True when interrupted by Ctrl-C."""
    per_task = _gpus_per_task(ray, gpus_per_job)
    resources = ray.cluster_resources()
    at_once = int(resources.get("GPU", 0) // per_task) if per_task else int(resources.get("CPU", 1))
    where = f"GPU tasks ({per_task:g} GPU each)" if per_task else "CPU tasks (no GPU in the cluster)"
    print(f"Ray {'at ' + address if address else 'on this machine'}: {resources.get('CPU', 0):g} CPUs, "
          f"{resources.get('GPU', 0):g} GPUs; {where}, up to {max(at_once, 1)} at a time", file=sys.stderr)
    # A GPU task gets a fresh worker process (max_calls=1): CUDA cannot move a process to other GPUs.
    task = ray.remote(num_cpus=1, num_gpus=per_task, max_calls=1 if per_task else 0, max_retries=1)(_task)
    config_ref = ray.put(config)
    pending = {task.remote(entry, config_ref): entry for entry in todo}
    counts = {"ok": 0, "failed": 0}
    bar = tqdm(total=len(todo), desc="captures", unit="capture", file=sys.stderr, dynamic_ncols=True)

    def take(ref) -> None:
        entry = pending.pop(ref)
        outcome = _outcome(ray, ref, entry)
        if outcome is None:
            return
        row, files = outcome
        _record(out_dir, manifest, rows, row, files)
        counts[row["status"]] += 1
        bar.update(1)
        bar.set_postfix(counts)
        ran_on = f"{row['host']} gpu {row['gpu']}" if row["gpu"] else (row["host"] or "?")
        seconds = f"{row['seconds']:.1f} s" if row["seconds"] is not None else ""
        bar.write(f"{row['status']:>6}  {entry.name}  {seconds}  {ran_on}" + (f"  {row['error']}" if row["error"] else ""),
                  file=sys.stderr)

    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in ready:
                take(ref)
        return False
    except KeyboardInterrupt:
        # A second Ctrl-C must not cut the clean-up short (cancel, Ray's shutdown, the manifest):
        # ignored until run_batch returns.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for ref in pending:
            ray.cancel(ref)
        ready = ray.wait(list(pending), num_returns=len(pending), timeout=CANCEL_GRACE_S)[0] if pending else []
        for ref in ready:  # a capture that finished before the cancel reached it is kept
            take(ref)
        return True
    finally:
        bar.close()


def format_summary(captures: List[CaptureEntry], rows: Dict[str, dict]) -> str:
    """A table of the batch's captures: status, seconds, where it ran, PSNR, error."""
    header = ("capture", "status", "seconds", "host", "gpu", "train_psnr", "error")
    lines = [header]
    for entry in captures:
        row = rows.get(entry.name) or {}
        psnr = row.get("metrics", {}).get("train_psnr")
        lines.append((entry.name, row.get("status", "not run"),
                      f"{row['seconds']:.1f}" if row.get("seconds") is not None else "",
                      row.get("host") or "", row.get("gpu") or ("cpu" if row.get("host") else ""),
                      f"{psnr:.2f}" if psnr is not None else "", row.get("error") or ""))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(("  ".join(cell.ljust(width) for cell, width in zip(line, widths)) + "  " + line[-1]).rstrip()
                     for line in lines)
