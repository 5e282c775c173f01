"""The streaming archive format: tar → zstandard → age (X25519 + ChaCha20-Poly1305 STREAM).

Nothing here is a home-made cipher or chunk format: the container is POSIX tar (PAX
headers, written by ``tarfile``), compression is one zstandard frame, and encryption is
the age format via ``pyrage`` (its ``encrypt_io`` / ``decrypt_io`` stream over file
objects; age authenticates every 64 KiB chunk and detects truncation).

Memory stays flat: the three stages run in threads joined by OS pipes, and the only
buffer that grows with the input is one database part (``PART_SIZE``). The database
dump is stored as consecutive tar members ``db/pgdump.part-NNNNNN`` because tar needs a
member's size before its data and ``pg_dump`` cannot say it in advance; restore
concatenates the parts in order into ``pg_restore``.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tarfile
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import IO, BinaryIO

import pyrage
import zstandard
from pyrage import x25519

PART_SIZE = 8 * 1024 * 1024
PIPE_BUFFER = 1024 * 1024
DB_PART_PREFIX = "db/pgdump.part-"
DB_SQLITE = "db/kms.sqlite3"


class ArchiveError(ValueError):
    """The archive stream could not be produced or read (message names the stage)."""


def new_identity() -> tuple[str, str]:
    """A fresh age X25519 identity: (secret identity string, public recipient string)."""
    ident = x25519.Identity.generate()
    return str(ident), str(ident.to_public())


class TarSink:
    """Writes tar members to a binary stream, one header + data + padding at a time
    (``tarfile``'s own header encoding; large data goes through without re-buffering)."""

    def __init__(self, out: BinaryIO, mtime: float):
        self.out = out
        self.mtime = int(mtime)

    def add(self, name: str, size: int, chunks: Iterable[bytes], mode: int = 0o600) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime, info.type = size, mode, self.mtime, tarfile.REGTYPE
        self.out.write(info.tobuf(format=tarfile.PAX_FORMAT))
        written = 0
        for chunk in chunks:
            self.out.write(chunk)
            written += len(chunk)
        if written != size:
            raise ArchiveError(f"tar member {name}: wrote {written} bytes, header said {size}")
        pad = (-size) % tarfile.BLOCKSIZE
        if pad:
            self.out.write(b"\0" * pad)

    def add_file(self, name: str, path: str) -> None:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            self.add(name, size, iter(lambda: f.read(1024 * 1024), b""), mode=0o600)

    def add_stream_in_parts(self, prefix: str, stream: IO[bytes], part_size: int = PART_SIZE) -> int:
        """Store an unsized stream as ``prefix000000``, ``prefix000001`` …; returns bytes stored."""
        total, n = 0, 0
        while True:
            buf = _read_full(stream, part_size)
            if not buf and n > 0:
                break
            self.add(f"{prefix}{n:06d}", len(buf), [buf] if buf else [])
            total += len(buf)
            n += 1
            if len(buf) < part_size:
                break
        return total

    def close(self) -> None:
        self.out.write(b"\0" * (2 * tarfile.BLOCKSIZE))


def _read_full(stream: IO[bytes], n: int) -> bytes:
    chunks, remaining = [], n
    while remaining > 0:
        chunk = stream.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


class _Worker(threading.Thread):
    def __init__(self, name: str, fn: Callable[[], None]):
        super().__init__(name=name, daemon=True)
        self.fn = fn
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised by the reader
            self.error = exc


class EncryptedStream:
    """A readable stream of the encrypted archive; hashes and counts what is read.

    At EOF it joins the producer threads and raises ``ArchiveError`` if any of them
    failed, so an object store reading it aborts the upload instead of storing a
    truncated archive."""

    def __init__(self, reader: BinaryIO, workers: list[_Worker], cleanup: Callable[[], None]):
        self._reader = reader
        self._workers = workers
        self._cleanup = cleanup
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.finished = False

    def read(self, n: int = -1) -> bytes:
        data = self._reader.read(n if n and n > 0 else PIPE_BUFFER)
        if data:
            self.sha256.update(data)
            self.size += len(data)
            return data
        self._join()
        self.finished = True
        return b""

    def _join(self) -> None:
        for w in self._workers:
            w.join()
        errors = [w for w in self._workers if w.error is not None]
        if errors:
            w = errors[0]
            raise ArchiveError(f"archive stage '{w.name}' failed: {w.error}") from w.error

    def close(self) -> None:
        try:
            self._reader.close()
        finally:
            for w in self._workers:
                w.join(timeout=30)
            self._cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def encrypted_archive(
    produce: Callable[[TarSink], None],
    recipient: str,
    *,
    mtime: float,
    level: int = 3,
    threads: int = 2,
    on_abort: Callable[[], None] = lambda: None,
) -> EncryptedStream:
    """Start the pipeline ``produce(tar) → zstd → age`` and return its readable end."""
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    for fd in (w1, w2):
        try:
            fcntl.fcntl(fd, 1031, PIPE_BUFFER)  # F_SETPIPE_SZ: fewer context switches
        except OSError:
            pass
    recipient_obj = x25519.Recipient.from_str(recipient)

    def compress() -> None:
        with os.fdopen(w1, "wb", buffering=PIPE_BUFFER) as raw:
            cctx = zstandard.ZstdCompressor(level=level, threads=threads)
            with cctx.stream_writer(raw, closefd=False, write_size=PIPE_BUFFER) as zw:
                try:
                    sink = TarSink(zw, mtime)
                    produce(sink)
                    sink.close()
                except BaseException:
                    on_abort()
                    raise

    def encrypt() -> None:
        with os.fdopen(r1, "rb", buffering=PIPE_BUFFER) as src, os.fdopen(w2, "wb", buffering=PIPE_BUFFER) as dst:
            pyrage.encrypt_io(src, dst, [recipient_obj])

    workers = [_Worker("tar+zstd", compress), _Worker("age-encrypt", encrypt)]
    for w in workers:
        w.start()
    return EncryptedStream(os.fdopen(r2, "rb", buffering=PIPE_BUFFER), workers, on_abort)


def hash_stream(stream: BinaryIO, chunk: int = PIPE_BUFFER) -> tuple[str, int]:
    sha, size = hashlib.sha256(), 0
    while True:
        data = stream.read(chunk)
        if not data:
            return sha.hexdigest(), size
        sha.update(data)
        size += len(data)


def iter_archive(src: BinaryIO, identity: str) -> Iterator[tuple[tarfile.TarInfo, IO[bytes]]]:
    """Decrypt, decompress and yield each tar member with a reader over its data.

    Raises ``ArchiveError`` when the ciphertext does not authenticate (tampered,
    truncated, wrong key)."""
    ident = x25519.Identity.from_str(identity)
    r, w = os.pipe()

    def decrypt() -> None:
        with os.fdopen(w, "wb", buffering=PIPE_BUFFER) as dst:
            pyrage.decrypt_io(src, dst, [ident])

    worker = _Worker("age-decrypt", decrypt)
    worker.start()
    reader = os.fdopen(r, "rb", buffering=PIPE_BUFFER)
    try:
        try:
            dctx = zstandard.ZstdDecompressor().stream_reader(reader, read_size=PIPE_BUFFER)
            with tarfile.open(fileobj=dctx, mode="r|") as tar:
                for member in tar:
                    data = tar.extractfile(member) if member.isfile() else None
                    if data is None:  # only regular files carry data
                        continue
                    yield member, data
        except (tarfile.TarError, zstandard.ZstdError, OSError) as exc:
            worker.join()
            if worker.error is not None:
                raise ArchiveError(f"archive does not decrypt: {worker.error}") from None
            raise ArchiveError(f"archive is malformed: {exc}") from None
        worker.join()
        if worker.error is not None:
            raise ArchiveError(f"archive does not decrypt: {worker.error}") from None
    finally:
        reader.close()
        worker.join(timeout=30)
