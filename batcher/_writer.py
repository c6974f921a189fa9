"""Write stage: the output folder, its lock, and images saved so no final name is ever partial.

Layout of `OUT`:
    OUT/images/<stem>.<ext>        one file per image (`<stem>_<k>.<ext>` when n > 1)
    OUT/images/<ab>/<stem>.<ext>   the same, in an output fanned out over subfolders (OUT/layout.json)
    OUT/images/.tmp-*              in-progress writes; removed by the next run
    OUT/manifest.jsonl             the journal (see _manifest)
    OUT/manifest.json              the manifest, rebuilt from the journal
    OUT/.lock                      the holder's PID; OUT itself and .lock are flock(2)ed while a run is going
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import os
import re
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path

from zlib_ng.zlib_ng import crc32

from ._exceptions import LockedError, OutputError, PermanentError
from ._layout import image_subdir

__all__ = ["OutputDir", "SavedImage", "sniff", "image_size", "truncation"]

DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO})


def sniff(data: bytes) -> str | None:
    """The image type from its magic bytes: png, jpeg, webp, gif, or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    return None


def truncation(data: bytes | bytearray | memoryview, kind: str) -> str | None:
    """Why an image of `kind` is not whole (cut short, or junk after its magic), or None when it is.

    Structure only, never pixels: PNG chunks walked to IEND with every CRC checked, JPEG ends
    at EOI, WebP holds the bytes its RIFF header declares, GIF ends with its trailer. One pass
    at memory speed (zlib-ng's crc32, SIMD, releases the GIL), so it runs with the write, off the event loop.

    >>> truncation(png_bytes[:-20], "png")
    'PNG chunk at byte 1234 runs past the end'
    """
    view = memoryview(data)
    if kind == "png":
        return _png_truncation(view)
    if kind == "jpeg":
        # encoders and CDNs may pad after EOI; zeros are the only padding seen in practice
        end = len(data)
        while end > 2 and data[end - 1] == 0:
            end -= 1
        return None if view[end - 2 : end] == b"\xff\xd9" else "JPEG does not end with EOI (FFD9)"
    if kind == "webp":
        declared = int.from_bytes(view[4:8], "little") + 8
        return None if len(data) >= declared else f"WebP declares {declared} bytes, has {len(data)}"
    if kind == "gif":
        return None if len(data) > 13 and data[-1] == 0x3B else "GIF does not end with its trailer (3B)"
    return f"unknown image kind {kind!r}"


def _png_truncation(view: memoryview) -> str | None:
    at, end = 8, len(view)
    while at + 12 <= end:
        length = int.from_bytes(view[at : at + 4], "big")
        stop = at + 12 + length
        if length > 0x7FFFFFFF or stop > end:
            return f"PNG chunk at byte {at} runs past the end"
        kind = view[at + 4 : at + 8]
        crc = int.from_bytes(view[stop - 4 : stop], "big")
        if crc32(view[at + 4 : stop - 4]) != crc:
            return f"PNG chunk {bytes(kind)!r} at byte {at} has a bad CRC"
        if kind == b"IEND":
            return None
        at = stop
    return "PNG ends before its IEND chunk"


def image_size(data: bytes, kind: str) -> tuple[int, int] | None:
    """(width, height) read from the header, without decoding the image."""
    try:
        if kind == "png" and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if kind == "gif":
            return struct.unpack("<HH", data[6:10])
        if kind == "webp":
            chunk = data[12:16]
            if chunk == b"VP8X":
                w = int.from_bytes(data[24:27], "little") + 1
                h = int.from_bytes(data[27:30], "little") + 1
                return w, h
            if chunk == b"VP8 ":
                w, h = struct.unpack("<HH", data[26:30])
                return w & 0x3FFF, h & 0x3FFF
            if chunk == b"VP8L":
                b = int.from_bytes(data[21:25], "little")
                return (b & 0x3FFF) + 1, ((b >> 14) & 0x3FFF) + 1
        if kind == "jpeg":
            i = 2
            while i + 9 < len(data):
                if data[i] != 0xFF:
                    return None
                marker = data[i + 1]
                length = struct.unpack(">H", data[i + 2 : i + 4])[0]
                if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
                    h, w = struct.unpack(">HH", data[i + 5 : i + 9])
                    return w, h
                i += 2 + length
    except struct.error:
        return None
    return None


@dataclass(frozen=True)
class SavedImage:
    file: str  # relative to OUT
    sha256: str
    bytes: int
    width: int | None
    height: int | None
    kind: str


class OutputDir:
    """An output folder: locked while in use, images written by temp-file-and-rename."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.images = self.root / "images"
        self.journal = self.root / "manifest.jsonl"
        self.manifest = self.root / "manifest.json"
        self._lock_fd: int | None = None
        self._dir_fd: int | None = None
        self.layout = "flat"  # or "fanout": images/<ab>/<stem>.<ext> (see _layout; set by the runner)
        self._subdirs: set[str] = set()
        # temp names: a random tag per OutputDir and a counter, not a uuid4 (a getrandom syscall) per image
        self._tmp_tag = secrets.token_hex(4)
        self._tmp_count = itertools.count()

    def refuse_foreign(self) -> None:
        """Raise OutputError unless OUT is absent, empty, or a batcher output (as `export` does).

        A batcher output holds its journal or manifest, or only what a first run leaves before
        its first record (`images/` with temp files, `.lock`). Anything else (a user's folder,
        `/`, `/etc`) is never written into, `--force` or not.
        """
        try:
            entries = {e.name: e for e in os.scandir(self.root)}
        except FileNotFoundError:
            return
        except NotADirectoryError:
            raise OutputError(f"{self.root}: output path exists and is not a folder") from None
        except OSError as exc:
            raise OutputError(f"{self.root}: can't read the output folder: {exc.strerror}") from None
        if not entries:
            return
        journal = entries.get(self.journal.name)
        if journal is not None and journal.is_file(follow_symlinks=False):
            with open(journal.path, "rb") as fh:
                head = fh.read(64)
            if not head or re.match(rb'\{\s*"t"\s*:', head):
                return  # its records are checked line by line when the run reads them
            raise OutputError(f"{journal.path}: not a batcher journal (its first line is no journal record); "
                              f"batcher won't touch this folder. Choose another --out")
        manifest = entries.get(self.manifest.name)
        if manifest is not None and manifest.is_file(follow_symlinks=False):
            with open(manifest.path, "rb") as fh:
                if fh.read(12) == b'{"version": ':  # how write_manifest starts every manifest
                    return
        images = entries.get(self.images.name)
        skeleton = set(entries) <= {self.images.name, ".lock"} and (
            images is None or (images.is_dir(follow_symlinks=False)
            and all(e.name.startswith(".tmp-") for e in os.scandir(images.path))))
        if not skeleton:
            raise OutputError(f"{self.root}: not empty and not a batcher output (no {self.journal.name}); "
                              f"batcher writes only into an empty folder or its own output. Choose "
                              f"another --out")

    def prepare(self) -> None:
        """Create the folders (raises OutputError when OUT is a file or unwritable)."""
        if self.root.exists() and not self.root.is_dir():
            raise OutputError(f"{self.root}: output path exists and is not a folder")
        if self.images.is_symlink():
            raise OutputError(f"{self.images}: is a symbolic link; batcher writes images only inside OUT")
        try:
            self.images.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{self.root}: can't create output folder: {exc.strerror}") from None

    def lock(self) -> None:
        """Take the folder's lock, or raise LockedError naming the holder's PID.

        The lock is flock(2) on the folder itself, which `rm OUT/.lock` cannot take away (the
        `.lock` file, also flocked, tells older batchers and users the holder's PID). flock dies
        with its process, so a run killed with -9 never leaves a stale lock.
        """
        try:
            dir_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise OutputError(f"{self.root}: can't open the output folder: {exc.strerror}") from None
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(dir_fd)
            raise LockedError(str(self.root), self._holder()) from None
        try:
            # O_NOFOLLOW: a `.lock` planted as a link out of OUT is never opened or written
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            os.close(dir_fd)
            raise OutputError(f"{self.root / '.lock'}: can't open the lock file: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # an older batcher locks only this file
        except BlockingIOError:
            os.close(fd)
            os.close(dir_fd)
            raise LockedError(str(self.root), self._holder()) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd, self._dir_fd = fd, dir_fd

    def _holder(self) -> int | None:
        """The PID the holder wrote into `.lock`, if it is still there."""
        try:
            fd = os.open(self.root / ".lock", os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
        except (ValueError, UnicodeDecodeError):
            return None
        finally:
            os.close(fd)

    def unlock(self) -> None:
        for fd in (self._lock_fd, self._dir_fd):
            if fd is not None:
                os.close(fd)  # closing releases the flock
        self._lock_fd = self._dir_fd = None

    def clean_temporaries(self) -> int:
        """Remove leftovers of interrupted writes; return how many."""
        removed = 0
        for entry in os.scandir(self.images):
            if entry.name.startswith(".tmp-"):
                try:
                    os.unlink(entry.path)
                    removed += 1
                except FileNotFoundError:
                    pass
        return removed

    def temp_path(self, stem: str) -> Path:
        return self.images / f".tmp-{stem[:40]}-{self._tmp_tag}{next(self._tmp_count):x}"

    def final_name(self, stem: str, index: int, count: int, kind: str) -> str:
        ext = "jpg" if kind == "jpeg" else kind
        return f"{stem}.{ext}" if count == 1 else f"{stem}_{index + 1}.{ext}"

    def save_bytes(self, stem: str, index: int, count: int, data: bytes) -> SavedImage:
        """Write image bytes under their final name, atomically. Runs in a worker thread."""
        kind = sniff(data)
        if kind is None:
            raise PermanentError("response image is not a PNG, JPEG, WebP or GIF", status=200, code="not_an_image")
        # the client checked the image is whole (a cut one is a malformed answer, retried)
        tmp = self.temp_path(stem)
        # os.open/os.write, not open(): a file object adds fstat, isatty and lseek calls per image
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        return self._publish(tmp, stem, index, count, kind, data)

    def adopt_file(self, tmp: Path, stem: str, index: int, count: int) -> SavedImage:
        """Publish a downloaded temp file under its final name. Runs in a worker thread."""
        data = tmp.read_bytes()
        kind = sniff(data)
        if kind is None:
            os.unlink(tmp)
            raise PermanentError("downloaded bytes are not an image", status=200, code="not_an_image")
        return self._publish(tmp, stem, index, count, kind, data)

    def _publish(self, tmp: Path, stem: str, index: int, count: int, kind: str, data: bytes) -> SavedImage:
        name = image_subdir(stem, self.layout) + self.final_name(stem, index, count, kind)
        final = self.images / name
        if "/" in name and name[:2] not in self._subdirs:
            final.parent.mkdir(exist_ok=True)
            self._subdirs.add(name[:2])
        # the rename is the commit: a reader sees the whole file under its final name or nothing
        os.replace(tmp, final)
        wh = image_size(data, kind)
        return SavedImage(
            file=f"images/{name}",
            sha256=hashlib.sha256(data).hexdigest(),
            bytes=len(data),
            width=wh[0] if wh else None,
            height=wh[1] if wh else None,
            kind=kind,
        )

    def has_file(self, rel: str, size: int) -> bool:
        try:
            return (self.root / rel).stat().st_size == size
        except OSError:
            return False
