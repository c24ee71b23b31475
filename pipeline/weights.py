"""Optional learned models: which are present, intact and usable (weights/manifest.json).

Every optional model is listed in the manifest with its files, sizes, sha256 checksums, source,
licence and what it enables. `status()` checks the files on disk and gives each model one state:

- ``available``: every file is there with the pinned size and sha256.
- ``unverified``: every file is there but the manifest pins no checksum for some of them, so
  nothing vouches for their content (the app may use them; the table says so).
- ``missing``: at least one file is absent (nothing is ever downloaded without `fetch`).
- ``corrupt``: a file has the wrong size or sha256 (a cut download or a different file).

The CLI (`python -m pipeline weights`) prints `format_table(status())`; the app's "Models" panel
shows `status_rows()`: the same rows. `fetch(name)` downloads through huggingface_hub, and only
when called. Nothing here imports torch, so the checks stay fast.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import PipelineError

REPO_ROOT = Path(__file__).resolve().parents[1]
STATES = ("available", "unverified", "missing", "corrupt")  # best to worst
TABLE_HEADERS = ("model", "status", "enables", "details")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 8 * 1024 * 1024

# (resolved path, size, mtime_ns) -> sha256: the app's panel re-checks on every page load, and
# rehashing multi-GB checkpoints each time would take seconds. A changed file changes the key.
_hash_cache: Dict[Tuple[str, int, int], str] = {}


@dataclass(frozen=True)
class WeightFile:
    path: str  # relative to the weights folder
    size: Optional[int]
    sha256: Optional[str]
    url: Optional[str] = None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    enables: str
    source: str
    licence: str
    files: Tuple[WeightFile, ...]
    package: Optional[str] = None  # Python module the model needs besides its files
    install: Optional[str] = None  # how to get that package
    hf_repo: Optional[str] = None  # fetched as a snapshot of this Hugging Face repo into hf_dir
    hf_dir: Optional[str] = None
    revision: Optional[str] = None


@dataclass(frozen=True)
class ModelStatus:
    name: str
    state: str  # one of STATES
    message: str
    enables: str


def default_weights_dir() -> Path:
    """$PHOTO3D_WEIGHTS, else the repository's weights/ folder."""
    env = os.environ.get("PHOTO3D_WEIGHTS")
    return Path(env).expanduser() if env else REPO_ROOT / "weights"


def _root(weights_dir: Optional[Path]) -> Path:
    return Path(weights_dir) if weights_dir is not None else default_weights_dir()


def manifest_path() -> Path:
    """$PHOTO3D_MANIFEST, else weights/manifest.json in the repository.

    Docker keeps the manifest outside the /app/weights volume: a volume keeps the files of its
    first run, so a manifest inside it would go stale when the image is rebuilt.
    """
    env = os.environ.get("PHOTO3D_MANIFEST")
    return Path(env).expanduser() if env else REPO_ROOT / "weights" / "manifest.json"


def load_manifest(path: Optional[Path] = None) -> List[ModelSpec]:
    """The models listed in the manifest, checked for the fields the loader relies on."""
    path = Path(path) if path is not None else manifest_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"weights manifest not found: {path} (set PHOTO3D_MANIFEST or restore the file)") from None
    except json.JSONDecodeError as exc:
        raise PipelineError(f"weights manifest {path} is not valid JSON: {exc}") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list):
        raise PipelineError(f"weights manifest {path}: expected an object with a 'models' list")
    specs = [_parse_model(path, i, m) for i, m in enumerate(models)]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise PipelineError(f"weights manifest {path}: model names must be unique, got {names}")
    return specs


def _parse_model(path: Path, index: int, m: object) -> ModelSpec:
    where = f"weights manifest {path}, model #{index + 1}"
    if not isinstance(m, dict):
        raise PipelineError(f"{where}: expected an object")
    for key in ("name", "enables", "source", "licence", "files"):
        if not m.get(key):
            raise PipelineError(f"{where}: '{key}' is missing")
    where = f"weights manifest {path}, model '{m['name']}'"
    files = []
    for f in m["files"]:
        rel = f.get("path") if isinstance(f, dict) else None
        if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise PipelineError(f"{where}: each file needs a relative 'path' inside the weights folder, got {f!r}")
        sha = f.get("sha256")
        if sha is not None and not _SHA256.match(sha):
            raise PipelineError(f"{where}: sha256 of {rel} must be 64 lowercase hex digits or null, got {sha!r}")
        size = f.get("size")
        if size is not None and (not isinstance(size, int) or size < 0):
            raise PipelineError(f"{where}: size of {rel} must be a byte count or null, got {size!r}")
        files.append(WeightFile(path=rel, size=size, sha256=sha, url=f.get("url")))
    hf_repo = m.get("hf_repo")
    hf_dir = m.get("hf_dir") or (Path(files[0].path).parts[0] if hf_repo else None)
    if hf_repo and not all(Path(f.path).parts[0] == hf_dir for f in files):
        raise PipelineError(f"{where}: files of a Hugging Face snapshot must all lie under '{hf_dir}/'")
    return ModelSpec(
        name=m["name"],
        enables=m["enables"],
        source=m["source"],
        licence=m["licence"],
        files=tuple(files),
        package=m.get("package"),
        install=m.get("install"),
        hf_repo=hf_repo,
        hf_dir=hf_dir,
        revision=m.get("revision"),
    )


def sha256_of(path: Path) -> str:
    """sha256 of a file, read in chunks (checkpoints can be GBs) and cached by (size, mtime)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _hash_cache:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
        _hash_cache[key] = digest.hexdigest()
    return _hash_cache[key]


def _check_file(root: Path, f: WeightFile) -> Tuple[str, str]:
    """(state, problem) of one file; problem is "" when it is available."""
    p = root / f.path
    if not p.is_file():
        return "missing", f"{f.path} not found"
    size = p.stat().st_size
    if f.size is not None and size != f.size:
        return "corrupt", f"{f.path} is {size:,} bytes, expected {f.size:,} (incomplete download or a different file)"
    if f.sha256 is None:
        return "unverified", f"{f.path} present, but the manifest pins no checksum for it"
    actual = sha256_of(p)
    if actual != f.sha256:
        return "corrupt", f"{f.path} has sha256 {actual[:12]}..., expected {f.sha256[:12]}... (a different or damaged file)"
    return "available", ""


def _model_status(spec: ModelSpec, root: Path) -> ModelStatus:
    checks = [_check_file(root, f) for f in spec.files]
    states = {state for state, _ in checks}
    # The worst state wins: a corrupt file matters more than a missing one, which matters more
    # than an unpinned checksum.
    state = next(s for s in reversed(STATES) if s in states)
    problems = "; ".join(msg for s, msg in checks if s == state)
    fetch_hint = f"run `python -m pipeline weights fetch {spec.name}` or copy it into {root}"
    if state == "available":
        message = f"{len(spec.files)} file(s) verified"
    elif state == "unverified":
        message = problems
    elif state == "missing":
        message = f"{problems}; {fetch_hint}"
    else:
        message = f"{problems}; delete it, then {fetch_hint}"
    if state in ("available", "unverified") and spec.package and not _module_present(spec.package):
        message += f"; needs Python package '{spec.package}', not installed ({spec.install or 'pip install ' + spec.package})"
    return ModelStatus(name=spec.name, state=state, message=message, enables=spec.enables)


def _module_present(module: str) -> bool:
    """Whether ``module`` is installed, without importing it (it may pull in CUDA)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def status(weights_dir: Optional[Path] = None, manifest: Optional[Path] = None) -> List[ModelStatus]:
    """The state of every model in the manifest, checked against the files in ``weights_dir``."""
    return [_model_status(spec, _root(weights_dir)) for spec in load_manifest(manifest)]


def model_status(name: str, weights_dir: Optional[Path] = None, manifest: Optional[Path] = None) -> ModelStatus:
    """The state of one model (PipelineError naming the known models if ``name`` is unknown)."""
    return _model_status(_find(name, load_manifest(manifest)), _root(weights_dir))


def rows(statuses: Sequence[ModelStatus]) -> List[List[str]]:
    """Table rows in TABLE_HEADERS order, shared by the CLI table and the app's panel."""
    return [[s.name, s.state, s.enables, s.message] for s in statuses]


def status_rows(weights_dir: Optional[Path] = None, manifest: Optional[Path] = None) -> List[List[str]]:
    """What the app's "Models" panel shows: `rows(status())`, headers in TABLE_HEADERS."""
    return rows(status(weights_dir, manifest))


def format_table(statuses: Sequence[ModelStatus]) -> str:
    """A plain-text table, one line per model, columns as in TABLE_HEADERS."""
    table = [list(TABLE_HEADERS)] + rows(statuses)
    widths = [max(len(r[i]) for r in table) for i in range(len(TABLE_HEADERS) - 1)]
    lines = ["  ".join([c.ljust(w) for c, w in zip(r[:-1], widths)] + [r[-1]]).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths + [len(TABLE_HEADERS[-1])]))
    return "\n".join(lines)


def _find(name: str, specs: Sequence[ModelSpec]) -> ModelSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    raise PipelineError(f"unknown model '{name}'; the manifest lists: {', '.join(s.name for s in specs)}")


def fetch(name: str, weights_dir: Optional[Path] = None, manifest: Optional[Path] = None) -> ModelStatus:
    """Download model ``name`` into the weights folder, with a progress bar, and verify it.

    Only ever called on request (CLI `weights fetch NAME`). Refuses when huggingface_hub is not
    installed or HF_HUB_OFFLINE is set, saying where to put the files by hand instead.
    """
    spec = _find(name, load_manifest(manifest))
    root = _root(weights_dir)
    by_hand = f"copy {', '.join(f.path for f in spec.files)} into {root} yourself (source: {spec.source})"
    try:
        from huggingface_hub import constants  # noqa: PLC0415 (optional; only for downloads)
    except ImportError:
        raise PipelineError(f"cannot download '{name}': huggingface_hub is not installed (pip install huggingface_hub); or {by_hand}") from None
    if constants.HF_HUB_OFFLINE:
        raise PipelineError(f"offline (HF_HUB_OFFLINE is set): not downloading '{name}'; {by_hand}")

    if spec.hf_repo:
        _fetch_snapshot(spec, root, by_hand)
    for f in spec.files:
        if f.url and _check_file(root, f)[0] not in ("available", "unverified"):
            _fetch_url(f, root, by_hand)
    result = _model_status(spec, root)
    if result.state in ("missing", "corrupt"):
        raise PipelineError(f"'{name}' is still {result.state} after the download: {result.message}")
    return result


def _fetch_url(f: WeightFile, root: Path, by_hand: str) -> None:
    from huggingface_hub.file_download import http_get  # noqa: PLC0415 (optional; only for downloads)

    target = root / f.path
    part = target.with_name(target.name + ".part")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with part.open("wb") as fh:
            http_get(f.url, fh, expected_size=f.size, displayed_filename=target.name)
    except Exception as exc:  # network, HTTP or disk errors: all end the same way for the user
        part.unlink(missing_ok=True)
        raise PipelineError(f"could not download {f.url}: {type(exc).__name__}: {exc}; if this machine is offline, {by_hand}") from None
    # Verify before the file takes its real name, so a bad download never looks present.
    state, problem = _check_file(root, WeightFile(part.relative_to(root).as_posix(), f.size, f.sha256))
    if state == "corrupt":
        part.unlink()
        raise PipelineError(f"downloaded file rejected: {problem}; the source may have changed, check {f.url}")
    os.replace(part, target)


def _fetch_snapshot(spec: ModelSpec, root: Path, by_hand: str) -> None:
    from huggingface_hub import snapshot_download  # noqa: PLC0415 (optional; only for downloads)

    try:
        snapshot_download(spec.hf_repo, revision=spec.revision, local_dir=root / spec.hf_dir)
    except Exception as exc:  # network, auth, missing repo: all end the same way for the user
        raise PipelineError(
            f"could not download https://huggingface.co/{spec.hf_repo}: {type(exc).__name__}: {exc}; "
            f"if this machine is offline, {by_hand}"
        ) from None
