"""Checkpoints with orbax: save/auto-resume a run, and `init_from` another run's backbone.

A checkpoint step holds two items: `state` ({params, batch_stats, opt_state, step}, readable with
plain orbax) and `data` (the input iterator's position, JSON).
"""

import hashlib
import json
import logging
import os
import re
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from tlx import distributed, freeze, rundir

RESUME_MODES = ("auto", "force")


def _not_step_metadata(record: logging.LogRecord) -> bool:
    """Drops orbax's warning that a `state` item has no _CHECKPOINT_METADATA: that file lives in
    the step directory above it, so every read of a run's variables (init_from) printed it."""
    return not str(record.msg).startswith("Metadata file does not exist")


logging.getLogger("absl").addFilter(_not_step_metadata)


class InitError(ValueError):
    """A checkpoint does not fit the model it is loaded into."""


class ResumeMismatch(InitError):
    """A run directory holds a run of another config than the one asked for."""


class Checkpointer:
    """Saves and restores a run's state under WORKDIR/checkpoints. In a multi-process run every
    process makes one and takes part in each save and restore (orbax writes one checkpoint);
    process 0 alone verifies, moves corrupt steps aside and writes checksums."""

    def __init__(self, workdir: str, max_to_keep: int = 2):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.max_to_keep = max_to_keep
        self.manager = self._manager()
        self._unsummed: list[int] = []  # saved steps whose checksums are not written yet

    def _manager(self):
        return ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=self.max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def good_step(self, log=None) -> int | None:
        """The newest step whose files match their checksums; newer corrupt steps are moved
        aside (to N.corrupt), each named in a warning."""
        if distributed.is_multi():  # process 0 decides, so that every process resumes one step
            step, moved = self._good_step(log) if distributed.is_main() else (None, False)
            code, moved = distributed.broadcast([-1 if step is None else step, int(moved)])
            step = None if code < 0 else code
        else:
            step, moved = self._good_step(log)
        if moved:
            self.manager.close()
            self.manager = self._manager()
        return step

    def _good_step(self, log) -> tuple[int | None, bool]:
        log = log or (lambda m: print(m, file=sys.stderr))
        moved = False
        for step in sorted(self.manager.all_steps(), reverse=True):
            path = os.path.join(self.directory, str(step))
            problem = verify(path)
            if problem is None:
                break
            log(f"[tlx] checkpoint {path} is corrupt ({problem}): moved to {path}.corrupt, "
                "resuming from the step before it")  # fmt: skip
            os.replace(path, f"{path}.corrupt")
            moved = True
        else:
            step = None
        return step, moved

    def save(self, step: int, state: dict, data_state: dict) -> None:
        # Orbax writes into a temporary directory and renames it when complete, so an
        # interrupted save never leaves a half-written step that a restore would read. The
        # step's checksums follow once it is complete (at the next save or wait).
        self._write_checksums()
        self._unsummed.append(step)
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
            ),
        )

    def restore(self, step: int, abstract_state: dict) -> tuple[dict, dict]:
        try:
            out = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
                ),
            )
        except ValueError as e:  # orbax: "User-provided restore item and on-disk value ..."
            first = str(e).strip().splitlines()[0][:200]
            raise InitError(
                f"cannot resume {self.directory}/{step}: its state does not fit this run's "
                f"({first}); it was written by another strategy or config, or by a tlx before "
                "the strategy interface (config v1, state keys lr_mult/l2_sp_ref): resume it "
                "with the code that wrote it, or start a new workdir"
            ) from None
        return out["state"], out["data"]

    def _write_checksums(self) -> None:
        self.manager.wait_until_finished()
        if not distributed.is_main():
            self._unsummed = []
            return
        for step in self._unsummed:
            path = os.path.join(self.directory, str(step))
            if os.path.isdir(path):  # not rotated away meanwhile
                write_checksums(path)
        self._unsummed = []

    def wait(self) -> None:
        self._write_checksums()

    def close(self) -> None:
        self._write_checksums()
        self.manager.close()


CHECKSUMS = "tlx_sha256.json"  # in each step directory: {relative path: sha256} of its files


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(step_dir: str) -> list[str]:
    out = []
    for top, _, files in os.walk(step_dir):
        out += [os.path.relpath(os.path.join(top, n), step_dir) for n in files if n != CHECKSUMS]
    return sorted(out)


def write_checksums(step_dir: str) -> None:
    sums = {rel: _sha256(os.path.join(step_dir, rel)) for rel in _files(step_dir)}
    tmp = os.path.join(step_dir, CHECKSUMS + ".tmp")
    with open(tmp, "w") as f:
        json.dump(sums, f, indent=0)
    os.replace(tmp, os.path.join(step_dir, CHECKSUMS))


def verify(step_dir: str) -> str | None:
    """What is wrong with a step directory's files against its checksums, or None. A step
    without checksums (written by an older tlx, or killed between its save and its checksums)
    passes: orbax finalised it."""
    try:
        with open(os.path.join(step_dir, CHECKSUMS)) as f:
            sums = json.load(f)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, OSError) as e:
        return f"unreadable {CHECKSUMS}: {e}"
    for rel, want in sums.items():
        path = os.path.join(step_dir, rel)
        if not os.path.exists(path):
            return f"{rel} is missing"
        if _sha256(path) != want:
            return f"{rel} differs from its checksum"
    return None


# -- resume: the run a directory holds against the one asked for ---------------------------------
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


def read_config(workdir: str, migrate=None) -> dict | None:
    """A run directory's config.json, through `migrate` (the caller's `tlx.config.migrate`: an
    older layout in today's), or None."""
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            tree = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if not isinstance(tree, dict):
        return None
    return migrate(tree) if migrate is not None else tree


def check_resume(
    workdir: str, tree: dict, where: str | None, resume: str = "auto", migrate=None
) -> tuple[list, bool]:
    """(the resume history to record in config.json, whether the config changed), once the
    config `tree` (a resolved config as a dict) is checked against the run `workdir` holds.
    `where`: what would be resumed (its latest checkpoint, or the finished run), None when the
    directory holds no state; `migrate`: turns the recorded config into today's layout.

    A recorded config that differs is refused (ResumeMismatch, one line: the fields and the
    fix) unless `resume='force'`, which adds the change to the history. A directory without state
    starts over, whatever its config.json says."""
    if resume not in RESUME_MODES:
        raise ValueError(f"resume={resume!r}: use one of {list(RESUME_MODES)}")
    old = read_config(workdir, migrate) if where else None
    if old is None:
        return [], False
    history = list(old.get("resume_history", []))
    diff = differences(rundir.comparable(old), rundir.comparable(tree))
    if not diff:
        return history, False
    shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diff[:8])
    if len(diff) > 8:
        shown += f", ... ({len(diff)} fields differ)"
    if resume != "force":
        raise ResumeMismatch(
            f"cannot resume {where}: it is a run of another config ({shown}); use a new workdir, "
            "or --resume=force (train.run(..., resume='force')) to continue it under this "
            "config, recorded in config.json's resume_history"
        )
    changed = {k: [a, b] for k, a, b in diff}
    return history + [{"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "changed": changed}], True


def truncate_metrics(path: str, step: int, final_splits=()) -> None:
    """metrics.jsonl without the records after `step` (those a resumed run writes again), nor
    the evaluations of `final_splits` at `step` (a run killed after its last save evaluates
    again), nor a line cut short by a kill; rewritten atomically."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict) or record.get("step", 0) > step:
                continue
            if record.get("step") == step and record.get("split") in final_splits:
                continue
            keep.append(json.dumps(record) + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def find_state_dir(path: str) -> str:
    """The `state` item of the checkpoint `path` names: a workdir, its checkpoints/ dir, a step
    dir, or a state dir. The newest finalised step is used where a directory holds several."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"init_from={path!r} does not exist. Give a tlx workdir (of a finished pre-training "
            "run), its checkpoints/ directory, one step directory, or a named source "
            "such as 'imagenet'."
        )
    if os.path.exists(os.path.join(path, "_METADATA")) or os.path.basename(path) == "state":
        _check_step(os.path.dirname(path))
        return path
    if os.path.isdir(os.path.join(path, "state")):
        _check_step(path)
        return os.path.join(path, "state")
    ckpt_dir = (
        os.path.join(path, "checkpoints")
        if os.path.isdir(os.path.join(path, "checkpoints"))
        else path
    )
    steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
    for step in reversed(steps):  # the newest step whose files match their checksums
        problem = verify(os.path.join(ckpt_dir, str(step)))
        if problem is None:
            return os.path.join(ckpt_dir, str(step), "state")
        print(f"[tlx] checkpoint {ckpt_dir}/{step} is corrupt ({problem}): using the step "
              "before it", file=sys.stderr)  # fmt: skip
    if not steps:
        raise FileNotFoundError(
            f"init_from={path!r} holds no finished checkpoint (looked in {ckpt_dir}). "
            "Did the pre-training run finish? Unfinished saves end in .orbax-checkpoint-tmp."
        )
    raise InitError(f"init_from={path!r}: every checkpoint in {ckpt_dir} is corrupt")


def _check_step(step_dir: str) -> None:
    problem = verify(step_dir)
    if problem is not None:
        raise InitError(f"checkpoint {step_dir} is corrupt ({problem})")


def read_variables(path: str) -> dict:
    """`params` and `batch_stats` (numpy) of a checkpoint, without its optimizer state."""
    state_dir = find_state_dir(path)
    ckptr = ocp.PyTreeCheckpointer()
    metadata = ckptr.metadata(state_dir)
    if metadata is None or getattr(metadata, "item_metadata", None) is None:
        raise InitError(f"{state_dir} has no readable metadata (_METADATA): not a whole checkpoint")
    tree = metadata.item_metadata.tree
    if "params" not in tree:
        raise InitError(f"{state_dir} has no 'params' at the top of its tree: {list(tree)}")
    target = {
        k: jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree[k])
        for k in ("params", "batch_stats")
        if k in tree
    }
    restored = ckptr.restore(
        state_dir,
        args=ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
        ),
    )
    restored.setdefault("batch_stats", {})
    return restored


def _flat(tree) -> dict[str, object]:
    return {freeze.path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def merge(
    target: dict, source: dict, reinit: list[str], reinit_init: str = "zeros", source_name: str = ""
) -> tuple[dict, dict]:
    """Load `source` variables into `target` (a freshly initialised model's variables), strictly.

    Leaves whose path (without the collection, e.g. 'head/kernel') matches a `reinit` regex keep
    a fresh value (zeros when reinit_init='zeros', the model's initialiser when 'init'); every
    other target leaf must exist
    in the source with the same shape, and every source leaf must be used or match `reinit`.
    Returns (merged variables, report).
    """
    if reinit_init not in ("zeros", "init"):
        raise ValueError(f"init_reinit_init={reinit_init!r}: use 'zeros' or 'init'")
    tgt, src = _flat(target), _flat(source)

    def is_reinit(path):  # 'params/head/kernel' -> matched as 'head/kernel'
        return any(re.search(p, path.split("/", 1)[-1]) for p in reinit)

    report = {"source": source_name, "loaded": [], "reinitialised": [], "skipped": []}
    missing, mismatched, merged = [], [], {}
    for path, fresh in tgt.items():
        if is_reinit(path):
            merged[path] = np.zeros_like(fresh) if reinit_init == "zeros" else fresh
            report["reinitialised"].append(path)
        elif path not in src:
            missing.append(path)
        elif tuple(src[path].shape) != tuple(fresh.shape):
            mismatched.append(
                f"{path}: checkpoint {tuple(src[path].shape)} vs model {tuple(fresh.shape)}"
            )
        else:
            merged[path] = np.asarray(src[path]).astype(fresh.dtype)
            report["loaded"].append(path)
    unexpected = []
    for path in src:
        if path in merged and path in report["loaded"]:
            continue
        if is_reinit(path):
            report["skipped"].append(path)
        else:
            unexpected.append(path)
    if missing or mismatched or unexpected:
        parts = []
        if mismatched:
            parts.append("shape mismatch:\n  " + "\n  ".join(mismatched))
        if missing:
            parts.append("in the model but not in the checkpoint:\n  " + "\n  ".join(missing))
        if unexpected:
            parts.append("in the checkpoint but not in the model:\n  " + "\n  ".join(unexpected))
        raise InitError(
            f"checkpoint {source_name} does not fit the model (re-initialised: {reinit}).\n"
            + "\n".join(parts)
            + "\nCheck that backbone (and its stem) match the pre-training run; list leaves to "
            "re-initialise in config.init_reinit (regexes over paths such as 'head/kernel')."
        )
    leaves = [merged[freeze.path_str(p)] for p, _ in jax.tree_util.tree_leaves_with_path(target)]
    return jax.tree.unflatten(jax.tree.structure(target), leaves), report


def write_report(workdir: str, report: dict) -> None:
    with open(os.path.join(workdir, "load_report.json"), "w") as f:
        json.dump(report, f, indent=1)
