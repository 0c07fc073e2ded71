"""Isolation levels of the code sandbox: who runs the program and inside what.

Strongest first:

1. ``firejail`` — no network, the run's directory as a private home, a read-only view of
   the system with /tmp, /var/tmp, /dev/shm and this project hidden, a private /etc holding
   only the dynamic loader's cache, no capabilities, seccomp, a private PID namespace, rlimits.
2. ``bwrap`` — user/PID/net/IPC/UTS namespaces, only /usr (and the lib/bin links) mounted
   read-only, the run's directory as the only writable place, no /etc, no /home, no /tmp.
3. ``unshare`` (root only) — net/PID/IPC/mount namespaces and an allowlisted root like
   bwrap's (a tmpfs with only the system directories read-only, the run's directory as
   /sandbox, /dev/null, /dev/zero and /dev/urandom), entered with chroot; then the sandbox
   user with no capabilities and rlimits. Weaker than bwrap: no user namespace, and the
   setup runs as root.
4. ``rlimits`` — a fresh session, a scrubbed environment, rlimits, the sandbox user when
   root. Weakest: no network isolation, and the program can signal processes of its user.
   Never chosen by ``auto``: it runs only when ``reward.code.isolation: rlimits`` names it.

Untrusted code never runs as root: when the trainer is root the program runs as
``reward.code.sandbox_user`` or one of its numbered siblings (``USER-1`` …, all created
by ``scripts/install.sh``), leased for the run so that programs checked at the same time never
share a uid and with it the per-user process limit; otherwise as the trainer's own
unprivileged user. Firejail's own ``--timeout`` is not used (it adds ~2 s
per run); the host times runs out itself and kills the whole process group.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pwd
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

LEVELS = ("firejail", "bwrap", "unshare", "rlimits")
# Levels that cut the program off the network and from the host's files and processes:
# `auto` picks among these only; rlimits runs when it is named explicitly.
ISOLATING = ("firejail", "bwrap", "unshare")
# Levels whose program lives in a private PID namespace: the harness may kill(-1) there.
PID_NAMESPACED = frozenset({"firejail", "bwrap", "unshare"})
SYSTEM_PATH = "/usr/bin:/bin"
# The jailed environment: nothing inherited from the trainer (tokens, keys, proxies).
SCRUBBED_ENV = {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
# RLIMIT_NPROC counts per user: each run leases its own sandbox user (POOL_SIZE of them), so a
# program that holds all of its processes cannot make a program checked beside it fail.
MAX_PROCESSES = 512
POOL_SIZE = 16  # sandbox users scripts/install.sh creates: USER, USER-1 … USER-15
LEASE_POLL_S = 0.02
MAX_FILE_BYTES = 16 << 20  # RLIMIT_FSIZE: no single file a test writes grows past this
PROJECT_ROOT = Path(__file__).resolve().parents[2]
BWRAP_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64")
# The top-level entries a firejailed program may see (an allowlist: the rest is blacklisted):
# the system, and the homes (firejail mounts the run's folder over the sandbox user's home
# and hides the others); /proc, /dev and /sys are firejail's own private views.
# What a firejailed program sees of /etc (a private copy): the loader's cache, nothing else — no
# host names, users, mounts or service configs.
FIREJAIL_ETC = ("ld.so.cache",)
FIREJAIL_VISIBLE = frozenset(
    {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "proc", "dev", "sys", "home", "root",
     "run"}
)


class SandboxUnavailable(RuntimeError):
    """No isolation level (or not the one named in the config) works on this machine."""


@dataclass(frozen=True)
class Identity:
    """Who runs the program: ``uid``/``gid`` set only when switching away from root."""

    uid: int | None
    gid: int | None
    name: str

    @property
    def switches(self) -> bool:
        return self.uid is not None


def sandbox_identity(user: str) -> Identity:
    """The sandbox user when we are root (refusing to go on without one), else ourselves."""
    if os.geteuid() != 0:
        return Identity(None, None, pwd.getpwuid(os.geteuid()).pw_name)
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise SandboxUnavailable(
            f"reward.code.sandbox_user={user!r}: no such user; run scripts/install.sh as root "
            "(it creates it) — untrusted code is never run as root"
        ) from None
    if entry.pw_uid == 0:
        raise SandboxUnavailable(
            f"reward.code.sandbox_user={user!r} is root; name an unprivileged user"
        )
    return Identity(entry.pw_uid, entry.pw_gid, user)


def pool(ident: Identity) -> list[Identity]:
    """The sandbox users a run may lease: ``ident`` and those of its numbered siblings that exist."""
    if not ident.switches:
        return [ident]
    members = [ident]
    for i in range(1, POOL_SIZE):
        try:
            entry = pwd.getpwnam(f"{ident.name}-{i}")
        except KeyError:
            continue
        if entry.pw_uid != 0:
            members.append(Identity(entry.pw_uid, entry.pw_gid, entry.pw_name))
    return members


@contextlib.contextmanager
def lease(ident: Identity, lock_dir: Path) -> Iterator[Identity]:
    """A sandbox user of ``pool(ident)`` that no other run holds, for one run.

    Held by an flock on ``lock_dir/NAME.lock`` (released by the kernel if the worker dies), so
    concurrent runs in any process of this trainer's user never share a uid. Waits while every
    member is busy (more programs at once than sandbox users). A pool of one is used as is.
    """
    members = pool(ident)
    if len(members) == 1:
        yield ident
        return
    lock_dir.mkdir(mode=0o700, exist_ok=True)
    first = os.getpid() % len(members)  # spread the workers over the pool
    while True:
        for k in range(len(members)):
            member = members[(first + k) % len(members)]
            fd = os.open(lock_dir / f"{member.name}.lock", os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                yield member
            finally:
                os.close(fd)  # releases the flock
            return
        time.sleep(LEASE_POLL_S)


def system_python() -> str:
    """The system interpreter (the sandbox user cannot read the project's virtualenv)."""
    found = shutil.which("python3", path=SYSTEM_PATH)
    if found is None:
        raise SandboxUnavailable("no python3 in /usr/bin:/bin for the sandboxed programs")
    return found


def command(level: str, workdir: Path, base: Path, ident: Identity) -> list[str]:
    """The argv that runs ``harness.py`` in ``workdir`` at ``level``."""
    python = system_python()
    if level == "firejail":
        return [
            "firejail", "--quiet", "--noprofile", "--net=none", f"--private={workdir}",
            "--private-cwd", *[f"--blacklist={path}" for path in _hidden(base)],
            "--private-dev", f"--private-etc={','.join(FIREJAIL_ETC)}", "--read-only=/",
            "--caps.drop=all", "--seccomp", "--nonewprivs", "--noroot", "--nosound",
            "--no3d", "--nodvd", "--notv", "--nou2f", "--novideo",
            f"--rlimit-nproc={MAX_PROCESSES}", f"--rlimit-fsize={MAX_FILE_BYTES}",
            python, "-I", "harness.py",
        ]  # fmt: skip
    if level == "bwrap":
        return ["bwrap", *_bwrap_mounts(workdir), python, "-I", "harness.py"]
    if level == "unshare":
        return [
            "unshare", "--net", "--ipc", "--pid", "--fork", "--kill-child", "--mount-proc", "--",
            "/bin/sh", "-c", UNSHARE_ROOT_SCRIPT, "sh", str(workdir), str(ident.uid), str(ident.gid),
            python, *BWRAP_SYSTEM_DIRS,
        ]  # fmt: skip
    if level == "rlimits":
        return [python, "-I", "harness.py"]
    raise ValueError(f"reward.code.isolation={level!r}: must be one of {LEVELS}")


# Builds the unshare level's root inside its new mount namespace (as root, before the program
# drops privileges): nothing of the host is visible but the system directories, read-only.
# Arguments: workdir uid gid python system-dir...
UNSHARE_ROOT_SCRIPT = r"""
set -e
work=$1 uid=$2 gid=$3 python=$4
shift 4
root=$work/.root
mkdir -m 700 "$root"
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs "$root"
for dir in "$@"; do
  if [ -L "$dir" ]; then
    ln -s "$(readlink "$dir")" "$root$dir"
  elif [ -d "$dir" ]; then
    mkdir -p "$root$dir"
    mount --bind "$dir" "$root$dir"
    mount -o remount,bind,ro,nosuid,nodev "$root$dir"
  fi
done
mkdir "$root/sandbox" "$root/proc" "$root/dev"
mount --bind "$work" "$root/sandbox"
mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
for node in null zero urandom random; do
  touch "$root/dev/$node"
  mount --bind "/dev/$node" "$root/dev/$node"
done
mount -o remount,ro,nosuid,nodev "$root"
exec /usr/sbin/chroot "$root" /usr/bin/env --chdir=/sandbox /usr/bin/setpriv --reuid="$uid" --regid="$gid" \
  --clear-groups --inh-caps=-all --bounding-set=-all --no-new-privs "$python" -I harness.py
"""


def _hidden(base: Path) -> list[str]:
    """What a firejailed program must not even read: everything at the top of the filesystem
    but FIREJAIL_VISIBLE (run folders with their ground truth, data, mounts, sockets), shared
    scratch (other programs' files) and this project."""
    outside = {str(path) for path in Path("/").iterdir() if path.name not in FIREJAIL_VISIBLE}
    # /run stays (firejail keeps its own state in /run/firejail); its sockets do not.
    outside |= {str(path) for path in Path("/run").glob("*") if path.name != "firejail"}
    return sorted(outside | {str(base), "/tmp", "/var/tmp", "/dev/shm", str(PROJECT_ROOT)})


def _bwrap_mounts(workdir: Path) -> list[str]:
    args = ["--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    for path in BWRAP_SYSTEM_DIRS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    args += ["--proc", "/proc", "--dev", "/dev", "--bind", str(workdir), "/sandbox"]
    args += ["--remount-ro", "/", "--chdir", "/sandbox", "--clearenv"]
    for key, value in {**SCRUBBED_ENV, "HOME": "/sandbox"}.items():
        args += ["--setenv", key, value]
    return args


def launch_env(level: str, workdir: Path, ident: Identity) -> dict[str, str]:
    """The scrubbed environment, with HOME where the program's writable directory is
    (firejail mounts the run's directory over the user's home)."""
    home = "/sandbox" if level == "unshare" else str(workdir)
    if level == "firejail":
        home = pwd.getpwuid(ident.uid if ident.switches else os.geteuid()).pw_dir
    return {**SCRUBBED_ENV, "HOME": home, "TMPDIR": home}  # /tmp is hidden or shared


def launch_identity(level: str, ident: Identity) -> Identity:
    """Who exec()s the command: ``unshare`` needs root to build namespaces and drops to
    the sandbox user itself (setpriv); every other level is launched as the sandbox user."""
    return Identity(None, None, "root") if level == "unshare" else ident


def candidates(preference: str, ident: Identity) -> list[str]:
    """Levels to try, strongest first: the isolating ones that are installed for ``auto``
    (never rlimits), else only the named one."""
    if preference != "auto":
        return [preference]
    levels = [lvl for lvl in ISOLATING if shutil.which(lvl)]
    if not ident.switches and os.geteuid() != 0:
        levels = [lvl for lvl in levels if lvl != "unshare"]  # needs root to make namespaces
    return levels


def report(level: str, failures: dict[str, str]) -> None:
    """Says once per process which level checks programs, loudly when it is a weak one."""
    skipped = "; ".join(f"{lvl}: {why}" for lvl, why in failures.items())
    if level in ("firejail", "bwrap"):
        log.info("code sandbox: %s%s", level, f" (unavailable: {skipped})" if skipped else "")
        return
    log.warning(
        "code sandbox: WEAK ISOLATION (%s) — untrusted programs are %s. Install firejail or "
        "bubblewrap (scripts/install.sh does, as root). Unavailable: %s",
        level,
        "in net/PID namespaces with only the system directories visible, but set up as root "
        "without a user namespace"
        if level == "unshare"
        else "limited by rlimits only, WITH network access",
        skipped or "none",
    )
