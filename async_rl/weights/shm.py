"""The same-host path: a publisher's send buffers are files in /dev/shm that subscribers map.

Files (all mode 0600, in ``SHM_DIR``), for a publisher with id ``pub``:

    async-rl-weights-<pub>.lock        held (flock LOCK_EX) while the publisher lives
    async-rl-weights-<pub>-v<version>  the send buffer of an announced version
    async-rl-weights-<pub>-spare<k>    a superseded buffer kept for reuse (not readable by name)

Invariants, enforced here with flock(2) — the kernel drops a dead process's locks:
  * The publisher writes a file only while it holds LOCK_EX on it (from ``claim`` or
    creation until ``publish``); a subscriber reads a file only while it holds LOCK_SH.
    So bytes a subscriber has verified cannot change until it lets go, even if the
    publisher has long forgotten it, and a file is recycled only once no reader is left.
  * When a newer version is installed the older file is renamed to a spare name at once:
    a subscriber that has not opened it yet fails to, and streams or waits for the next.
  * At most ``MAX_NAMED_FILES`` data files per publisher carry a name. A spare still read
    by a slow subscriber when a new buffer is needed is unlinked (its memory lives until
    that reader unmaps it) and a new file is made.
  * The lock file exists before any data file and is removed after the last, so a
    publisher that finds data files whose lock it can take knows their owner died
    (SIGKILL, OOM) and deletes them (``sweep_orphans``).

Space is reserved with posix_fallocate when a file is made, so a full /dev/shm is an
error at creation (the caller streams instead), never a SIGBUS while copying.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import logging
import mmap
import os
import re
import stat
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
PREFIX = "async-rl-weights-"
FILE_MODE = 0o600
# The latest version plus the one being written; more would hold memory the host may need.
MAX_NAMED_FILES = 2
# Free space left in /dev/shm for everyone else when deciding whether a version fits.
HEADROOM_BYTES = 256 << 20
# How long publish() waits for a reader that just finished to drop its lock before it makes
# a new file instead (a fresh file costs page faults worth several copies).
CLAIM_WAIT_S = 0.05
CLAIM_POLL_S = 0.001
# Mappings a subscriber keeps between versions (the publisher alternates two files), so
# page tables are built once, not per version.
MAX_CACHED_MAPPINGS = 2
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14
_NAME = re.compile(rf"{PREFIX}(\d+)(\.lock|-v\d+|-spare\d+)")


def version_name(pub: int, version: int) -> str:
    return f"{PREFIX}{pub}-v{version}"


def host_id() -> str | None:
    """Who may read our /dev/shm files: this boot of this kernel, this /dev/shm mount, and this
    network namespace.

    The network namespace makes a node what the network sees as one: processes in different
    namespaces (containers, or the simulated nodes of the two-node test) are different nodes to
    the job, so they stream over TCP even where they happen to share /dev/shm. None where there
    is no /dev/shm (the same-host path is then off).
    """
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        mount = os.stat(SHM_DIR)
        network = os.stat("/proc/self/ns/net")
    except OSError:
        return None
    return f"{boot}:{mount.st_dev}:{network.st_ino}"


# --------------------------------------------------------------------------- publisher side


class ShmFile:
    """One publisher file, mapped read-write; ``buffer`` is a uint8 tensor over all of it."""

    def __init__(self, path: Path, nbytes: int) -> None:
        self.path = path
        self.nbytes = max(nbytes, 1)
        self.named = True
        self.spare = False  # renamed away from its version: recyclable once no reader holds it
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)  # nobody knows the name yet; held until published
            os.posix_fallocate(self._fd, 0, self.nbytes)
            self._map = mmap.mmap(self._fd, self.nbytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        except BaseException:
            os.close(self._fd)
            path.unlink(missing_ok=True)
            raise
        self.buffer = torch.frombuffer(self._map, dtype=torch.uint8)

    def claim(self, path: Path) -> bool:
        """Take the write lock if no reader holds the file, and rename it to ``path``."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        if not self.rename(path):
            return False
        self.spare = False
        return True

    def publish(self) -> None:
        """Let readers in: the bytes are final until the next ``claim``."""
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def rename(self, path: Path) -> bool:
        """False if someone else removed our name (the file then is never offered again)."""
        try:
            os.rename(self.path, path)
        except FileNotFoundError:
            self.named = False
            return False
        self.path = path
        return True

    def unlink(self) -> None:
        """Remove the name; the memory lives on until every mapping of it is gone."""
        if self.named:
            self.path.unlink(missing_ok=True)
            self.named = False

    def close(self) -> None:
        self.unlink()
        if self._fd >= 0:
            os.close(self._fd)  # the mapping stays valid for tensors that still view it
            self._fd = -1


class ShmStore:
    """A publisher's files in ``SHM_DIR``: made, recycled across versions, and removed."""

    def __init__(self, pub: int, directory: Path = SHM_DIR) -> None:
        self._dir = directory
        self._pub = pub
        sweep_orphans(directory)
        self._lock_path = directory / f"{PREFIX}{pub}.lock"
        self._lock_fd = _hold_lock_file(directory, self._lock_path)
        self._files: list[ShmFile] = []  # every file of ours that has a name
        self._spare_ids = itertools.count()
        self._failing = False

    def create(self, version: int, nbytes: int) -> ShmFile | None:
        """A new file for ``version``, write-locked; None (logged once) when it cannot be made."""
        for spare in [f for f in self._files if f.spare]:
            if len(self._files) < MAX_NAMED_FILES:
                break
            self._files.remove(spare)  # still read, or too small: its readers keep the memory
            spare.unlink()
        try:
            fs = os.statvfs(self._dir)
            free = fs.f_bavail * fs.f_frsize
            if nbytes + HEADROOM_BYTES > free:
                raise OSError(errno.ENOSPC, f"only {free / 2**30:.2f} GiB free")
            file = ShmFile(self._dir / version_name(self._pub, version), nbytes)
        except OSError as exc:
            if not self._failing:
                log.warning("weights: cannot place a %.2f GiB version in %s (%s); streaming over the "
                            "socket until one fits", nbytes / 2**30, self._dir, exc.strerror or exc)
            self._failing = True
            return None
        self._failing = False
        self._files.append(file)
        return file

    def claim(self, file: ShmFile, version: int) -> bool:
        return file.named and file.claim(self._dir / version_name(self._pub, version))

    def retire(self, file: ShmFile) -> None:
        """``file`` no longer holds the latest version: take its version name away."""
        if file.named and not file.spare:
            file.spare = file.rename(self._dir / f"{PREFIX}{self._pub}-spare{next(self._spare_ids)}")
        if not file.named and file in self._files:
            self._files.remove(file)

    def discard(self, file: ShmFile) -> None:
        if file in self._files:
            self._files.remove(file)
        file.close()

    def close(self) -> None:
        """Remove every file, then the lock file (in that order; see the module docstring)."""
        for file in self._files:
            file.close()
        self._files.clear()
        self._lock_path.unlink(missing_ok=True)
        os.close(self._lock_fd)


def _hold_lock_file(directory: Path, path: Path) -> int:
    """Create ``path`` already locked: made under a hidden name, locked, then renamed."""
    hidden = directory / f".{path.name}"
    fd = os.open(hidden, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(hidden, path)
    return fd


def sweep_orphans(directory: Path = SHM_DIR) -> list[str]:
    """Delete our files left by publishers that died; returns the names removed."""
    owners: dict[str, list[Path]] = {}
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    for entry in entries:
        match = _NAME.fullmatch(entry.name)
        if match and entry.stat(follow_symlinks=False).st_uid == os.getuid():
            owners.setdefault(match.group(1), []).append(Path(entry.path))
    removed = []
    for pub, paths in owners.items():
        lock = directory / f"{PREFIX}{pub}.lock"
        fd = _lock_if_dead(lock)
        if fd is None:
            continue
        for path in sorted(paths, key=lambda p: p == lock):  # the lock file goes last
            path.unlink(missing_ok=True)
            removed.append(path.name)
        if fd >= 0:
            os.close(fd)
    if removed:
        log.info("weights: removed %d file(s) of dead publishers from %s", len(removed), directory)
    return removed


def _lock_if_dead(lock: Path) -> int | None:
    """-1 if ``lock`` is gone, an fd holding it if its owner is dead, None if it lives."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


# --------------------------------------------------------------------------- subscriber side


@dataclass
class _Mapping:
    """A private (copy-on-write) mapping of a whole publisher file."""

    pub: int
    size: int
    map: mmap.mmap
    buffer: torch.Tensor  # uint8 [size]

    @classmethod
    def of(cls, fd: int, pub: int, size: int) -> _Mapping:
        # Python's mmap keeps a dup() of the fd it maps, which would hold our read lock for
        # as long as the mapping is cached: map a second open of the same file instead.
        own = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            # MAP_PRIVATE: a callback that writes into its tensors changes its own copy of
            # those pages, never the file another subscriber reads.
            mapped = mmap.mmap(own, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(own)
        try:
            mapped.madvise(MADV_POPULATE_READ)  # build the page tables in one call
        except OSError:
            pass
        return cls(pub, size, mapped, torch.frombuffer(mapped, dtype=torch.uint8))

    def close(self) -> None:
        self.buffer = None
        try:
            self.map.close()
        except BufferError:  # a tensor still views it; it unmaps when that tensor goes
            pass


class Reading:
    """One version being read: holds the file's shared lock until ``close``."""

    def __init__(self, fd: int, mapping: _Mapping, fresh: bool, nbytes: int) -> None:
        self._fd = fd
        self.mapping = mapping
        self.fresh = fresh
        self.nbytes = nbytes

    @property
    def buffer(self) -> torch.Tensor:
        return self.mapping.buffer[: self.nbytes]

    @property
    def view(self) -> memoryview:
        return memoryview(self.mapping.map)[: self.nbytes]

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> Reading:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MappedFiles:
    """A subscriber's mappings of publisher files, reused while the publisher recycles them."""

    def __init__(self, directory: Path = SHM_DIR) -> None:
        self._dir = directory
        self._cache: OrderedDict[tuple[int, int], _Mapping] = OrderedDict()

    def open(self, pub: int, version: int, nbytes: int) -> Reading:
        """Lock and map version ``version`` of publisher ``pub``; OSError when that is not possible."""
        fd = os.open(self._dir / version_name(pub, version),
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # fails while the publisher rewrites it
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size < max(nbytes, 1):
                raise OSError(errno.EINVAL, f"not a regular file of ours with {nbytes} bytes")
            for key in [k for k, m in self._cache.items() if m.pub != pub]:
                self._cache.pop(key).close()  # a restarted publisher: its old files are gone
            key = (st.st_dev, st.st_ino)
            mapping = self._cache.pop(key, None)
            fresh = mapping is None or mapping.size != st.st_size
            if fresh:
                if mapping is not None:
                    mapping.close()
                mapping = _Mapping.of(fd, pub, st.st_size)
            self._cache[key] = mapping
            while len(self._cache) > MAX_CACHED_MAPPINGS:
                self._cache.popitem(last=False)[1].close()
            return Reading(fd, mapping, fresh, nbytes)
        except BaseException:
            os.close(fd)
            raise

    def remap(self, reading: Reading) -> None:
        """Replace a cached mapping by a fresh one (our copy-on-write pages hide the file's)."""
        for key, mapping in list(self._cache.items()):
            if mapping is reading.mapping:
                self._cache[key] = _Mapping.of(reading._fd, mapping.pub, mapping.size)
                mapping.close()
                reading.mapping, reading.fresh = self._cache[key], True

    def close(self) -> None:
        while self._cache:
            self._cache.popitem()[1].close()
