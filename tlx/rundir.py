"""One process per run directory: `lock` (tlx.main, train.run and the sweep's runners share it),
and the config keys that do not change what a run computes (`IGNORE`).

    with rundir.lock(workdir):      # a second process gets WorkdirLocked, naming the holder
        ...
"""

import contextlib
import fcntl
import os
import socket
import time

# Keys of a resolved config that don't change what a run computes: left out of the run hash
# (`tlx.sweep.config_hash`) and of the resume check. `resume_history` is not a config field: it
# is what config.json records of forced resumes.
IGNORE = ("progress", "tensorboard", "data.data_dir", "resume_history")

_HELD: dict[str, int] = {}  # lock path -> how many times this process holds it (re-entrant)


class WorkdirLocked(RuntimeError):
    """Another process trains in this run directory."""


@contextlib.contextmanager
def lock(directory: str, wait: bool = False):
    """Hold DIRECTORY/.lock (flock: the kernel drops it when its holder dies, even by SIGKILL).
    `wait`: block until it is free (the sweep's runners share work this way); else raise
    WorkdirLocked naming the holder (pid, host, since). Re-entrant within one process."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, ".lock")
    if _HELD.get(path):
        _HELD[path] += 1
        try:
            yield
        finally:
            _HELD[path] -= 1
        return
    with open(path, "a+") as f:  # not "w": that would erase the holder's name before we know it
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "an unknown process"
            raise WorkdirLocked(
                f"workdir {directory} is in use by {holder}: wait for it to finish, or use "
                "another --workdir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on host {socket.gethostname()} since {time.ctime()}\n")
        f.flush()
        _HELD[path] = 1
        try:
            yield
        finally:
            del _HELD[path]
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)
