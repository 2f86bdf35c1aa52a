"""A run directory and its life, owned by one object: `RunDir(path)`.

    DIR/config.json      the resolved config (with `resume_history` after forced resumes)
    DIR/metrics.jsonl    one JSON object per logged step and per evaluation
    DIR/summary.json     the final figures; written last and atomically: it marks a finished run
    DIR/failed.json      a run that stopped with an error: {status, error, type, time}, status
                         'diverged' (a non-finite loss or parameter), 'interrupted' or 'failed'
    DIR/checkpoints/     orbax steps (`tlx.checkpoint`), each with its checksums
    DIR/load_report.json what `init_from` loaded;  DIR/sweep_run.json  what the sweep asked for
    DIR/stale/DIGEST/    a finished run set aside because its data changed (`set_aside`)
    DIR/.lock            one process per run directory (`lock`)

Train, sweep, checkpoint, lora and report ask it for paths, atomic JSON writes, whether a run is
finished / failed / diverged, the resume check, metrics truncation, set-aside and migration; the
hash of what makes runs comparable is `config_hash`. A record that exists but cannot be read is
an `Unreadable` error (one line: the file, what is wrong, how to override), never taken for absent:
an unreadable config.json must not switch the resume check off.
"""

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import time

CONFIG, SUMMARY, FAILED, METRICS = "config.json", "summary.json", "failed.json", "metrics.jsonl"
SWEEP_RUN, LOAD_REPORT, STALE = "sweep_run.json", "load_report.json", "stale"
RESUME_MODES = ("auto", "force")

# Keys of a resolved config that don't change what a run computes: left out of the run hash
# (`config_hash`) and of the resume check. `resume_history` is not a config field: it is what
# config.json records of forced resumes.
IGNORE = ("progress", "tensorboard", "data.data_dir", "resume_history")
# Fields added after runs existed, left out of the hash and the resume check while at their
# default (which computes what runs before them did), so no existing run changes its hash.
OMIT_AT_DEFAULT = {"model.dtype": "float32"}


class RunDirError(ValueError):
    """A run directory that tlx will not use as it is (a ValueError: the CLIs print one line)."""


class Unreadable(RunDirError):
    """A record of a run directory (config.json, summary.json, checksums) exists but cannot be
    read: what the directory holds is unknown, so it is refused rather than guessed."""


class NotWritable(RunDirError):
    """The run directory cannot be written (read-only, no permission)."""


class DiskFull(RunDirError):
    """A write failed for lack of space; the last good checkpoint is kept."""


class WorkdirLocked(RuntimeError):
    """Another process trains in this run directory."""


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


def config_hash(config) -> str:
    """The hash of a resolved config (a ConfigDict, or a dict such as a run's config.json), over
    its JSON form (tuples as lists), without the keys that don't change what a run computes
    (`comparable`: IGNORE, and fields added since runs existed, at their default)."""
    tree = config if isinstance(config, dict) else json.loads(config.to_json_best_effort())
    tree = comparable(tree)  # a JSON round trip of its own
    text = json.dumps(tree, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def file_sha256(path: str) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB blocks: tlx's one file hasher."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: str, obj, indent=1) -> None:
    """`obj` as JSON at `path`, atomically (a temporary file renamed over it): a kill leaves the
    old file or the new one, never half of one."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent, default=str)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def read_json(path: str, override: str = "--resume=force"):
    """The JSON at `path`, None when there is no such file; one that exists but is not JSON is
    an `Unreadable` error naming it, what is wrong and `override`."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise unreadable(path, e, override) from None


def unreadable(path: str, e: Exception, override: str = "--resume=force") -> Unreadable:
    what = f"not JSON ({e})" if isinstance(e, json.JSONDecodeError) else f"{type(e).__name__}: {e}"
    return Unreadable(
        f"{path} cannot be read: {what}; tlx cannot tell which run this directory holds and "
        f"changed nothing in it: fix or remove the file, use a new workdir, or {override} "
        "to override"
    )


def differences(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """[(dotted key, old value, new value)] where two config trees differ."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append((f"{prefix}{k}", a, b))
    return out


def _enospc(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        e = e.__cause__ or e.__context__
    return False


class RunDir:
    """One run directory: its paths, its records and their atomic writes, its state (finished,
    failed, diverged), the resume check, metrics truncation and set-aside."""

    def __init__(self, path: str):
        self.path = os.path.abspath(str(path))

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def checkpoints(self) -> str:
        return self.file("checkpoints")

    # -- reads -------------------------------------------------------------------------------
    def config(self, migrate=None, force: bool = False) -> dict | None:
        """config.json through `migrate` (`tlx.config.migrate`: an older layout in today's), or
        None when there is none; unreadable: `Unreadable`, or None when `force`."""
        try:
            tree = read_json(self.file(CONFIG))
        except Unreadable:
            if force:
                return None
            raise
        if tree is not None and not isinstance(tree, dict):
            if force:
                return None
            raise unreadable(self.file(CONFIG), ValueError(f"a {type(tree).__name__}, not a dict"))
        return migrate(tree) if migrate is not None and tree is not None else tree

    def summary(self, force: bool = False) -> dict | None:
        """The summary of a finished run, else None; unreadable: `Unreadable` (None when
        `force`: the run then counts as unfinished and resumes from its checkpoint)."""
        try:
            return read_json(self.file(SUMMARY), "--resume=force (train it again)")
        except Unreadable:
            if force:
                return None
            raise

    def failed(self) -> dict | None:
        """failed.json, or None (unreadable too: it only describes an error already shown)."""
        try:
            out = read_json(self.file(FAILED))
        except Unreadable:
            return None
        return out if isinstance(out, dict) else None

    def diverged(self) -> dict | None:
        """A run that stopped on a non-finite loss or parameter, as a summary: {'diverged': True,
        'error', 'val_accuracy': None, 'test_accuracy': None, 'wall_s': 0.0}; else None. It is
        finished too: trained again, it would diverge again."""
        failed = self.failed()
        if failed is None or failed.get("status") != "diverged":
            return None
        return {
            "diverged": True,
            "error": failed.get("error", ""),
            "val_accuracy": None,
            "test_accuracy": None,
            "wall_s": 0.0,
        }

    def finished(self) -> dict | None:
        """The summary of a finished run, or of a diverged one (`diverged`), or None."""
        return self.summary() or self.diverged()

    def metrics(self, log=None) -> list[dict]:
        """The records of metrics.jsonl in order; a line that is not JSON (cut by a kill) is
        skipped, and `log` told which."""
        out = []
        with open(self.file(METRICS)) as f:
            for number, line in enumerate(f, 1):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    if log is not None:
                        log(f"{self.file(METRICS)}:{number}: not JSON, skipped")
        return out

    # -- writes ------------------------------------------------------------------------------
    def write(self, name: str, obj, indent=1) -> None:
        write_json(self.file(name), obj, indent)

    def write_failed(self, status: str, error: BaseException) -> None:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        record = {"status": status, "error": first, "type": type(error).__name__}
        self.write(FAILED, {**record, "time": time.ctime()})

    def start_over(self, tree: dict, history: list, step: int, final_splits=()) -> None:
        """What a run does to its directory before it trains: no longer finished nor failed,
        its config (with `history`) written, metrics.jsonl truncated to `step`."""
        for name in (SUMMARY, FAILED):
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.file(name))
        if history:
            tree = {**tree, "resume_history": history}
        self.write(CONFIG, tree)
        self.truncate_metrics(step, final_splits)

    def truncate_metrics(self, step: int, final_splits=()) -> None:
        """metrics.jsonl without the records after `step` (those a resumed run writes again),
        nor the evaluations of `final_splits` at `step` (a run killed after its last save
        evaluates again), nor a line cut short by a kill; rewritten atomically."""
        path = self.file(METRICS)
        if not os.path.exists(path):
            return
        keep = []
        for record in self.metrics():
            if not isinstance(record, dict) or record.get("step", 0) > step:
                continue
            if record.get("step") == step and record.get("split") in final_splits:
                continue
            keep.append(json.dumps(record) + "\n")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)

    # -- the resume check --------------------------------------------------------------------
    def check_resume(
        self, tree: dict, where: str | None, resume: str = "auto", migrate=None
    ) -> tuple[list, bool]:
        """(the resume history to record in config.json, whether the config changed), once the
        config `tree` (a resolved config as a dict) is checked against the run this directory
        holds. `where`: what would be resumed (its latest checkpoint, or the finished run), None
        when the directory holds no state; `migrate`: turns the recorded config into today's.

        A recorded config that differs is refused (`ResumeMismatch`, one line: the fields and
        the fix) unless `resume='force'`, which adds the change to the history; so is one that
        cannot be read (`Unreadable`). A directory without state starts over, whatever its
        config.json says."""
        from tlx.checkpoint import ResumeMismatch

        if resume not in RESUME_MODES:
            raise ValueError(f"resume={resume!r}: use one of {list(RESUME_MODES)}")
        if not where:
            return [], False
        force = resume == "force"
        old = self.config(migrate, force=force)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        if old is None:
            if force and os.path.exists(self.file(CONFIG)):  # unreadable, overridden
                changed = {CONFIG: ["<unreadable>", "<this config>"]}
                return [{"time": stamp, "changed": changed}], True
            return [], False
        history = list(old.get("resume_history", []))
        diff = differences(comparable(old), comparable(tree))
        if not diff:
            return history, False
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diff[:8])
        if len(diff) > 8:
            shown += f", ... ({len(diff)} fields differ)"
        if not force:
            raise ResumeMismatch(
                f"cannot resume {where}: it is a run of another config ({shown}); use a new "
                "workdir, or --resume=force (train.run(..., resume='force')) to continue it "
                "under this config, recorded in config.json's resume_history"
            )
        changed = {k: [a, b] for k, a, b in diff}
        return history + [{"time": stamp, "changed": changed}], True

    # -- stale runs --------------------------------------------------------------------------
    def stale(self, summary: dict, data_config, init_from: str = "") -> tuple[str | None, str]:
        """(why this finished run must be trained again, or None; a note when it could not be
        checked). It must when its dataset as built changed since it ran (the fingerprint in
        its summary.json against today's, `tlx.data.fingerprint`: computed once per dataset and
        process, from the builder's metadata and a sample of records), or when the run it
        started from (`init_from`) was trained again since (sweep_run.json records that run's
        summary)."""
        from tlx import data

        note = ""
        recorded = (summary.get("dataset") or {}).get("fingerprint")
        name = data_config.name
        if recorded:
            try:
                current = data.fingerprint(data_config)
            except data.DatasetNotPreparedError:
                current, note = None, f"dataset {name} not checked: it is not prepared here"
            if current is not None and current != recorded:
                return (
                    f"its dataset {name} changed (fingerprint {recorded} in summary.json, "
                    f"{current} as built now)"
                ), note
        elif not summary.get("diverged"):
            note = "dataset not checked: its summary.json predates dataset fingerprints"
        parent = RunDir(init_from).file(SUMMARY) if init_from else ""
        try:
            seen = (read_json(self.file(SWEEP_RUN)) or {}).get("init_summary")
        except Unreadable:
            seen = None  # the sweep's own note: a kill while writing it checks nothing
        if seen and os.path.exists(parent) and file_sha256(parent)[:16] != seen:
            return f"the run it starts from, {os.path.basename(init_from)}, was trained again", note
        return None, note

    def set_aside(self, why: str) -> str:
        """Moves a finished run's files (all but its lock) into DIR/stale/DIGEST/ (the digest of
        its summary.json or failed.json) with why.txt, so the directory starts over; returns that
        path, relative to the sweep's directory. The checkpoints go first and the summary last:
        a kill in between leaves a run that is still finished (and stale), never an unfinished
        old one that a resume would complete; the next set-aside moves the rest there too."""
        marker = next(p for p in map(self.file, (SUMMARY, FAILED)) if os.path.exists(p))
        dest = os.path.join(self.path, STALE, file_sha256(marker)[:16])
        os.makedirs(dest, exist_ok=True)
        names = sorted(set(os.listdir(self.path)) - {".lock", STALE})
        last = (SUMMARY, FAILED)
        for name in sorted(names, key=lambda n: (n in last, n != "checkpoints", n)):
            os.replace(self.file(name), os.path.join(dest, name))
        with open(os.path.join(dest, "why.txt"), "w") as f:
            f.write(why + "\n")
        return os.path.relpath(dest, os.path.dirname(os.path.dirname(self.path)))

    # -- writing at all ----------------------------------------------------------------------
    def lock(self, wait: bool = False, process: int = 0):
        return lock(self.path, wait, process)

    def disk_full(self, e: BaseException, last_step: int | None) -> DiskFull | None:
        """A `DiskFull` error (one line) when `e` comes from a full disk, else None."""
        if not _enospc(e):
            return None
        kept = (
            f"the last good checkpoint, step {last_step}, is kept "
            f"({os.path.join(self.checkpoints, str(last_step))})"
            if last_step is not None
            else "no checkpoint was saved yet"
        )
        return DiskFull(
            f"no space left on device writing {self.path}: {kept}; free space and re-run the "
            "same command to resume"
        )


def not_writable(directory: str, e: OSError) -> NotWritable:
    return NotWritable(
        f"workdir {directory} is not writable ({e.strerror or e}): give a --workdir you can "
        "write to (a finished run there can still be read: run it with its own config)"
    )


def migrate_runs(runs_dir: str, log=print) -> dict[str, str]:
    """Run directories written under an older config layout (`tlx.config.migrate`), renamed to
    the hash their config has today, so the sweep reads them instead of training them again:
    {old hash: new hash}. Parents (runs that others start from) go first, since a child's hash
    names its parent's. The old config.json is kept as config.v1.json."""
    from tlx import config as tlx_config

    configs = {}
    for name in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []:
        try:
            c = RunDir(os.path.join(runs_dir, name)).config()
        except Unreadable:
            continue  # refused, with its one line, when its cell runs
        if c is not None and c.get("config_version", 1) < tlx_config.CONFIG_VERSION:
            configs[name] = c
    renamed: dict[str, str] = {}

    def visit(name: str) -> str:
        if name in renamed:
            return renamed[name]
        tree = tlx_config.migrate(configs[name])
        parent = os.path.basename(str(tree.get("init_from", "")).rstrip("/"))
        hashed = dict(tree)
        if parent in configs or parent in renamed:
            new_parent = visit(parent)
            hashed["init_from"] = f"sweep:{new_parent}"
            tree["init_from"] = os.path.join(runs_dir, new_parent)
        new = config_hash(hashed)
        src, dst = os.path.join(runs_dir, name), os.path.join(runs_dir, new)
        renamed[name] = new
        if new != name:
            if os.path.exists(dst):
                log(f"[sweep] {name}: migrates to {new}, which exists already; left as it is")
                return new
            os.rename(src, dst)  # first: a kill after it leaves a v1 config that migrates again
        os.replace(os.path.join(dst, CONFIG), os.path.join(dst, "config.v1.json"))
        with open(os.path.join(dst, CONFIG), "w") as f:
            json.dump(tree, f, indent=1)
        return new

    for name in list(configs):
        visit(name)
    if renamed:
        log(f"[sweep] migrated {len(renamed)} run(s) written with config v1 to today's hashes")
    return renamed


_HELD: dict[str, int] = {}  # lock path -> how many times this process holds it (re-entrant)


@contextlib.contextmanager
def lock(directory: str, wait: bool = False, process: int = 0):
    """Hold DIRECTORY/.lock (flock: the kernel drops it when its holder dies, even by SIGKILL).
    `wait`: block until it is free (the sweep's runners share work this way); else raise
    WorkdirLocked naming the holder (pid, host, since). Re-entrant within one process.
    `process`: the process index in a multi-process run, each of which holds its own lock
    (.lock for process 0, .lock.N for N), so a second job on the directory meets the first.
    A directory that cannot be written raises `NotWritable` (one line)."""
    directory = os.path.abspath(directory)
    path = os.path.join(directory, ".lock" + (f".{process}" if process else ""))
    if _HELD.get(path):
        _HELD[path] += 1
        try:
            yield
        finally:
            _HELD[path] -= 1
        return
    try:
        os.makedirs(directory, exist_ok=True)
        f = open(path, "a+")  # noqa: SIM115 - not "w": that would erase the holder's name
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise not_writable(directory, e) from None
        raise
    with f:
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
