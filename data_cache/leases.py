"""Leases: a (stage, shard) is claimed by one job before it runs, so several jobs on one store split the work.

A lease is the file ``_done/<stage>/<shard>.lease`` of the store (next to the shard's done marker; the done-marker
readers glob ``*.json`` and never see it) holding its owner — host, pid, job id — and a heartbeat time:

* **created atomically**: the owner's record is written whole to a temporary file, then hard-linked to the lease's
  name; ``link(2)`` fails when the name exists, on a local and on a shared (NFS) file system alike, so of two jobs
  claiming one shard exactly one succeeds and nobody ever reads a half-written lease. No extra service is needed.
* **renewed**: while the shard runs, a heartbeat thread of the owner rewrites the record with the time now, every
  ``timeout / 6`` seconds.
* **released** after the shard's done marker is written (the lease file is removed).
* **stale** when its heartbeat is older than ``timeout`` seconds (default :data:`DEFAULT_TIMEOUT`): its owner died
  (SIGKILL, a lost machine) or is hung. Another job may then **take it over**: under a per-lease POSIX file lock
  (``fcntl``, the lock the store's writers already rely on; the OS releases it when a process dies) the taker
  re-reads the record, checks it is still the same stale one and replaces it with its own — two successors never
  both take it. An owner whose lease was taken over (its heartbeat finds another owner's record) logs it; its
  shard then runs twice, which is harmless since each shard's writes are idempotent.

Staleness compares a heartbeat written by one host with the clock of another: the hosts' clocks must agree to well
within ``timeout`` (NTP keeps them within milliseconds).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from . import schema

log = logging.getLogger("cns.leases")

#: Seconds without a heartbeat after which a lease is stale. The heartbeat is written every ``timeout / 6`` s by a
#: thread of the worker running the shard; 180 s leaves room for that thread being starved for a minute or more
#: (torch keeping every core busy on a shared 2-core machine, a long GC pause, a shared file system's slow writes)
#: without a live job losing its shard, while a crashed job's shards wait at most 3 minutes for a successor.
DEFAULT_TIMEOUT = 180.0
SUFFIX = ".lease"


def new_owner(job: str | None = None) -> dict:
    """The owner record of this process for job ``job`` (a fresh id when None)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "job": job or uuid.uuid4().hex[:12]}


def lease_path(store_dir: str | os.PathLike, stage: str, shard: int | str) -> Path:
    name = f"{shard:05d}" if isinstance(shard, int) else str(shard)
    return Path(store_dir) / schema.DONE_DIR / stage / f"{name}{SUFFIX}"


def read(path: Path) -> dict | None:
    """The lease's record, or None when there is no lease (or it was just released)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def describe(record: dict, now: float | None = None) -> str:
    age = (now or time.time()) - float(record.get("heartbeat", 0))
    return f"job {record.get('job')} (host {record.get('host')}, pid {record.get('pid')}, heartbeat {age:.0f} s ago)"


def is_stale(record: dict | None, timeout: float, now: float | None = None) -> bool:
    return record is not None and (now or time.time()) - float(record.get("heartbeat", 0)) > timeout


def _write_tmp(path: Path, record: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _takeover_lock(path: Path) -> FileLock:
    lock = Path(path.parent.parent.parent) / schema.LOCKS_DIR / "leases" / f"{path.parent.name}__{path.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(lock))


@dataclass
class Lease:
    """A held lease; ``with lease:`` keeps it alive with a heartbeat thread and releases it at the end."""
    path: Path
    owner: dict
    timeout: float
    took_over: dict | None = None  # the stale owner's record when this lease was taken over
    lost_to: dict | None = None  # set by the heartbeat when another job took the lease over

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread = None

    def _record(self) -> dict:
        return {**self.owner, "heartbeat": time.time()}

    def renew(self) -> bool:
        """Rewrite the heartbeat if the lease is still ours; False (and ``lost_to`` set) when it is not."""
        with _takeover_lock(self.path):
            current = read(self.path)
            if current is None or any(current.get(k) != self.owner[k] for k in ("host", "pid", "job")):
                self.lost_to = current
                return False
            os.replace(_write_tmp(self.path, self._record()), self.path)
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.timeout / 6):
            if not self.renew():
                log.warning("lease %s was taken over by %s: this job's heartbeat was older than %.0f s",
                            self.path, describe(self.lost_to) if self.lost_to else "nobody (removed)", self.timeout)
                return

    def __enter__(self) -> "Lease":
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.path.name}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Stop the heartbeat and remove the lease file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with _takeover_lock(self.path):
            current = read(self.path)
            if current is not None and all(current.get(k) == self.owner[k] for k in ("host", "pid", "job")):
                self.path.unlink()


def try_acquire(store_dir, stage: str, shard: int | str, owner: dict,
                timeout: float = DEFAULT_TIMEOUT) -> tuple[Lease | None, dict | None]:
    """Claim (stage, shard): ``(lease, None)`` when this job now holds it (created, or taken over from a stale
    owner), ``(None, holder)`` when a live owner holds it (``holder`` is its record)."""
    path = lease_path(store_dir, stage, shard)
    lease = Lease(path, dict(owner), float(timeout))
    tmp = _write_tmp(path, lease._record())
    try:
        os.link(tmp, path)  # atomic: fails when the lease exists
        return lease, None
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    with _takeover_lock(path):
        holder = read(path)
        if holder is not None:
            if not is_stale(holder, timeout) and not _owner_died_here(holder):
                return None, holder
            os.replace(_write_tmp(path, lease._record()), path)
    if holder is None:  # released meanwhile: claim it as new, outside the lock (a job linking without it may win)
        return try_acquire(store_dir, stage, shard, owner, timeout)
    lease.took_over = holder
    log.warning("took over the lease of %s %s from %s: %s", stage, shard, describe(holder),
                "its process is gone" if _owner_died_here(holder) else f"no heartbeat for over {timeout:.0f} s")
    return lease, None


def _owner_died_here(record: dict) -> bool:
    """Whether the owner ran on this host and its process no longer exists (a SIGKILLed job, a restarted dask
    worker): its lease is stale at once, without waiting for the timeout."""
    return process_gone(record.get("host"), record.get("pid"))


def process_gone(host, pid) -> bool:
    """Whether process ``pid`` of ``host`` is known to be gone: only decidable on this host (elsewhere: False).
    Hosts that share a store must have distinct host names (containers sharing the host's name and not its
    process table would see each other's live owners as gone, and a shard would run twice: harmless, not lost)."""
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, TypeError):  # alive under another user; or not a pid
        return False
    return False


def holder_gone(store_dir, stage: str, shard: int | str, timeout: float) -> bool:
    """Whether (stage, shard) is no longer held by a live owner: released, stale, or its process gone."""
    record = read(lease_path(store_dir, stage, shard))
    return record is None or is_stale(record, timeout) or _owner_died_here(record)


def hold(store_dir, stage: str, shard: int | str, owner: dict, timeout: float = DEFAULT_TIMEOUT,
         poll: float = 0.5) -> Lease:
    """Claim (stage, shard), waiting (polling every ``poll`` s) while a live owner holds it."""
    while True:
        lease, _ = try_acquire(store_dir, stage, shard, owner, timeout)
        if lease is not None:
            return lease
        time.sleep(poll)
