"""Per-browser-session state: a private temp folder and the run in progress.

Each session (gradio's ``session_hash``: a page load or a gradio_client) gets a folder for its
unpacked uploads and results, created on first use and removed when the session ends
(`Blocks.unload`). Results get a new file name per run, so the 3D viewer, which reloads only
when the path changes, always shows the latest.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional

if TYPE_CHECKING:
    from pipeline.events import Result
    from ui.devices import PipelineWorker


@dataclass
class Run:
    """One reconstruction: its cancel flag, polled by the pipeline, and the worker that runs it."""

    number: int
    folder: Path
    cancel: threading.Event = field(default_factory=threading.Event)
    pipeline: Optional["PipelineWorker"] = None
    report: Optional[object] = None  # ui.report.RunReport, so Stop can show what was done

    def active(self) -> bool:
        return self.pipeline is not None and self.pipeline.thread.is_alive()

    def stop(self) -> None:
        """Ask the pipeline to stop and wake the handler that streams it."""
        self.cancel.set()
        if self.pipeline is not None:
            self.pipeline.interrupt()

    def join(self, timeout: Optional[float] = None) -> None:
        if self.pipeline is not None:
            self.pipeline.thread.join(timeout)


@dataclass
class Session:
    folder: Path
    runs: int = 0
    current: Optional[Run] = None
    result: Optional["Result"] = None  # the latest finished run's, shown in the 3D viewer

    def new_run(self) -> Run:
        self.runs += 1
        run = Run(self.runs, self.folder / f"run-{self.runs:03d}")
        run.folder.mkdir(parents=True, exist_ok=True)
        self.current = run
        return run


class Sessions:
    """All live sessions, each in its own folder under ``root`` (thread-safe)."""

    def __init__(self, parent: Path):
        # The app puts ``parent`` in gradio's upload folder: files returned from there are served
        # without another copy, and `delete_cache` ages them out even when a session never ends
        # cleanly. One folder per app process, so two apps on one machine never share.
        Path(parent).mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="photo3d-sessions-", dir=parent))
        self._sessions: Dict[str, Session] = {}
        self._lock = threading.Lock()

    def get(self, session_hash: str) -> Session:
        with self._lock:
            if session_hash not in self._sessions:
                folder = Path(tempfile.mkdtemp(prefix=_safe_prefix(session_hash), dir=self.root))
                self._sessions[session_hash] = Session(folder)
            return self._sessions[session_hash]

    def peek(self, session_hash: str) -> Optional[Session]:
        with self._lock:
            return self._sessions.get(session_hash)

    def close(self, session_hash: str) -> None:
        """Stop the session's run and delete its folder (once the run has let go of it)."""
        with self._lock:
            session = self._sessions.pop(session_hash, None)
        if session is not None:
            _remove_when_done(session)

    def close_all(self, wait_s: float = 30.0) -> None:
        """At shutdown: stop every run, give them ``wait_s`` to let go, delete all folders.

        Waiting matters: a job thread still inside torch when the interpreter exits aborts it.
        """
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        runs = [s.current for s in sessions if s.current is not None and s.current.active()]
        for run in runs:
            run.stop()
        deadline = time.monotonic() + wait_s
        for run in runs:
            run.join(max(0.0, deadline - time.monotonic()))
        shutil.rmtree(self.root, ignore_errors=True)

    def all(self) -> List[Session]:
        with self._lock:
            return list(self._sessions.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)


def _remove_when_done(session: Session) -> None:
    run = session.current
    if run is None or not run.active():
        shutil.rmtree(session.folder, ignore_errors=True)
        return
    run.stop()

    def remove_after_run() -> None:
        # The pipeline still writes into the folder until it sees the cancel flag.
        run.join()
        shutil.rmtree(session.folder, ignore_errors=True)

    threading.Thread(target=remove_after_run, name="photo3d-session-cleanup", daemon=True).start()


def _safe_prefix(session_hash: str) -> str:
    """A folder name prefix from a client-chosen session id: only letters, digits, '-' and '_'."""
    return "".join(c for c in session_hash if c.isalnum() or c in "-_")[:40] + "-"
