"""A FUSE filesystem the test controls: a pass-through to a real directory whose fsync
(and write) can be switched to fail with EIO at a chosen moment.

Run as a process of its own (`python eio_fs.py BACKING MOUNTPOINT CONTROL`), so that
the kernel's requests are served by a program the test can stop however the test
ends. Switches are files in CONTROL, outside the mount: while `CONTROL/fail-fsync`
exists, fsync(2), fdatasync(2) and a directory's fsync answer EIO; while
`CONTROL/fail-write` exists, write(2) does. Each failed call appends one line
(`fsync /PATH`) to `CONTROL/failures`, so the test can count what the daemon met.

A failed fsync also drops what was written to that file since its last good sync (the
backing file is cut back to that size), as the kernel drops the dirty pages of a
writeback that failed: the next fsync of the file then "succeeds" over data that is
gone, which is the trap a daemon must not fall into (PostgreSQL's "fsyncgate").
FUSE's default write-through mode keeps no dirty pages in the kernel for these files:
every write reaches this process, and an fsync is answered by it alone.

`EioMount` is the test's side: mount (or say why this machine cannot), flip the
switches, read the failures, unmount.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any


def unavailable() -> str | None:
    """Why this machine cannot mount the test's FUSE filesystem, or None."""
    if os.geteuid() != 0:
        return "mounting a FUSE filesystem here needs root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    try:
        with open("/proc/filesystems", encoding="ascii") as handle:
            if "\tfuse\n" not in handle.read():
                return "the kernel has no fuse filesystem"
    except OSError as exc:
        return f"cannot read /proc/filesystems: {exc}"
    probe = subprocess.run([sys.executable, "-c", "import mfusepy"], capture_output=True,
                           text=True, check=False)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return f"mfusepy cannot load libfuse (install fuse3 or libfuse2): {last}"
    return None


class EioMount:
    """The pass-through mounted at `mountpoint` over `backing`, switched via `control`."""

    def __init__(self, backing: Path, mountpoint: Path, control: Path) -> None:
        self.backing, self.mountpoint, self.control = backing, mountpoint, control
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = control / "eio_fs.log"

    def mount(self, timeout: float = 20.0) -> None:
        """Start the filesystem and wait until it is mounted; AssertionError if not."""
        for path in (self.backing, self.mountpoint, self.control):
            path.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, str(self.backing), str(self.mountpoint),
                 str(self.control)], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.unmount()
                raise AssertionError(f"the FUSE filesystem did not mount at "
                                     f"{self.mountpoint}:\n{self.log.read_text()}")
            time.sleep(0.02)

    def fail(self, operation: str, on: bool = True) -> None:
        """Make `operation` ("fsync" or "write") fail with EIO from now on, or not."""
        switch = self.control / f"fail-{operation}"
        if on:
            switch.touch()
        else:
            switch.unlink(missing_ok=True)

    def failures(self) -> list[str]:
        try:
            return (self.control / "failures").read_text().splitlines()
        except FileNotFoundError:
            return []

    def unmount(self) -> None:
        if os.path.ismount(self.mountpoint):
            umount = shutil.which("fusermount3") or shutil.which("fusermount")
            command = [umount, "-u", "-z"] if umount else ["umount", "-l"]
            subprocess.run([*command, str(self.mountpoint)], check=False,
                           capture_output=True)
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if os.path.ismount(self.mountpoint):  # never leak a mount
            subprocess.run(["umount", "-l", str(self.mountpoint)], check=False)

    def __enter__(self) -> EioMount:
        self.mount()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmount()


def serve(backing: Path, mountpoint: Path, control: Path) -> None:
    """The filesystem process: pass every call through to `backing`, failing on switch."""
    import mfusepy as fuse

    lock = threading.Lock()
    synced_size: dict[str, int] = {}  # path -> size at its last good sync

    def failing(operation: str, path: str) -> bool:
        if not (control / f"fail-{operation}").exists():
            return False
        with lock, (control / "failures").open("a") as handle:
            handle.write(f"{operation} {path}\n")
        return True

    class PassThrough(fuse.Operations):  # type: ignore[misc]  # untyped library
        use_ns = True

        def _full(self, path: str) -> str:
            return str(backing) + path

        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            try:
                st = os.lstat(self._full(path))
            except OSError as exc:
                raise fuse.FuseOSError(exc.errno) from exc
            fields = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks")
            attrs = {key: getattr(st, key) for key in fields}
            attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns,
                         st_ctime=st.st_ctime_ns)
            return attrs

        def readdir(self, path: str, fh: int) -> list[str]:
            return [".", "..", *os.listdir(self._full(path))]

        def statfs(self, path: str) -> dict[str, int]:
            vfs = os.statvfs(self._full(path))
            return {key: getattr(vfs, key) for key in (
                "f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree",
                "f_files", "f_flag", "f_frsize", "f_namemax")}

        def access(self, path: str, amode: int) -> int:
            return 0

        def open(self, path: str, flags: int) -> int:
            return os.open(self._full(path), flags & ~os.O_APPEND)

        def create(self, path: str, mode: int, fi: Any = None) -> int:
            return os.open(self._full(path), os.O_RDWR | os.O_CREAT, mode)

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            return os.pread(fh, size, offset)

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            if failing("write", path):
                raise fuse.FuseOSError(errno.EIO)
            return os.pwrite(fh, data, offset)

        def truncate(self, path: str, length: int, fh: int | None = None) -> int:
            os.truncate(self._full(path), length)
            return 0

        def fsync(self, path: str, datasync: int, fh: int) -> int:
            if failing("fsync", path):
                os.ftruncate(fh, min(synced_size.get(path, 0), os.fstat(fh).st_size))
                raise fuse.FuseOSError(errno.EIO)
            (os.fdatasync if datasync else os.fsync)(fh)
            synced_size[path] = os.fstat(fh).st_size
            return 0

        def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
            if failing("fsync", path):
                raise fuse.FuseOSError(errno.EIO)
            fd = os.open(self._full(path), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return 0

        def flush(self, path: str, fh: int) -> int:
            return 0

        def release(self, path: str, fh: int) -> int:
            os.close(fh)
            return 0

        def unlink(self, path: str) -> int:
            os.unlink(self._full(path))
            synced_size.pop(path, None)
            return 0

        def mkdir(self, path: str, mode: int) -> int:
            os.mkdir(self._full(path), mode)
            return 0

        def rmdir(self, path: str) -> int:
            os.rmdir(self._full(path))
            return 0

        def rename(self, old: str, new: str) -> int:
            os.rename(self._full(old), self._full(new))
            return 0

        def chmod(self, path: str, mode: int) -> int:
            os.chmod(self._full(path), mode)
            return 0

        def chown(self, path: str, uid: int, gid: int) -> int:
            os.chown(self._full(path), uid, gid)
            return 0

        def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
            with contextlib.suppress(OSError):
                os.utime(self._full(path), ns=times)
            return 0

    fuse.FUSE(PassThrough(), str(mountpoint), foreground=True, fsname="eio_fs")


if __name__ == "__main__":
    serve(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
