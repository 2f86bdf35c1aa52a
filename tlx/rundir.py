"""One process per run directory: `lock` (tlx.main, train.run and the sweep's runners share it),
and the config keys that do not change what a run computes (`IGNORE`).

    with rundir.lock(workdir):      # a second process gets WorkdirLocked, naming the holder
        ...
"""

import contextlib
import fcntl
import json
import os
import socket
import time

# Keys of a resolved config that don't change what a run computes: left out of the run hash
# (`tlx.sweep.config_hash`) and of the resume check. `resume_history` is not a config field: it
# is what config.json records of forced resumes.
IGNORE = ("progress", "tensorboard", "data.data_dir", "resume_history")
# Fields added after runs existed, left out of the hash and the resume check while at their
# default (which computes what runs before them did), so no existing run changes its hash.
OMIT_AT_DEFAULT = {
    "model.dtype": "float32",
    "feature_cache_max_mb": 4096.0,
    "data.val_examples_per_class": 0,
}


def comparable(tree: dict) -> dict:
    """A resolved config as a dict without the keys that don't change what a run computes:
    `IGNORE`, and `OMIT_AT_DEFAULT` keys at their default. What run hashes and resume checks
    compare."""
    tree = json.loads(json.dumps(tree, default=str))
    for key in (*IGNORE, *OMIT_AT_DEFAULT):
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict) and leaf in node:
            if key in IGNORE or node[leaf] == OMIT_AT_DEFAULT[key]:
                node.pop(leaf)
    return tree


_HELD: dict[str, int] = {}  # lock path -> how many times this process holds it (re-entrant)


class WorkdirLocked(RuntimeError):
    """Another process trains in this run directory."""


@contextlib.contextmanager
def lock(directory: str, wait: bool = False, process: int = 0):
    """Hold DIRECTORY/.lock (flock: the kernel drops it when its holder dies, even by SIGKILL).
    `wait`: block until it is free (the sweep's runners share work this way); else raise
    WorkdirLocked naming the holder (pid, host, since). Re-entrant within one process.
    `process`: the process index in a multi-process run, each of which holds its own lock
    (.lock for process 0, .lock.N for N), so a second job on the directory meets the first."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, ".lock" + (f".{process}" if process else ""))
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
