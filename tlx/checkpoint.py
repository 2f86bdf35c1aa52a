"""Checkpoints with orbax: save/auto-resume a run, and `init_from` another run's backbone.

A checkpoint step holds two items: `state` ({params, batch_stats, opt_state, step}, readable with
plain orbax) and `data` (the input iterator's position, JSON).
"""

import json
import logging
import os
import re
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from tlx import distributed, freeze, rundir

RESUME_MODES = rundir.RESUME_MODES


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

    def last_on_disk(self) -> int | None:
        """The newest step finalised on disk (orbax renames a step's directory when complete),
        whatever this manager was doing when it failed."""
        names = os.listdir(self.directory) if os.path.isdir(self.directory) else []
        steps = [int(d) for d in names if d.isdigit()]
        return max(steps, default=None)

    def good_step(self, log=None, force: bool = False) -> int | None:
        """The newest step whose files match their checksums; newer corrupt steps are moved
        aside (to N.corrupt), each named in a warning. Checksums that cannot be read are an
        `rundir.Unreadable` error, nothing moved, unless `force` (then that step is corrupt)."""
        if distributed.is_multi():  # process 0 decides, so that every process resumes one step
            step, moved, error = None, False, None
            if distributed.is_main():
                try:
                    step, moved = self._good_step(log, force)
                except rundir.Unreadable as e:
                    error = e
            code, moved = distributed.broadcast(
                [-2 if error else -1 if step is None else step, int(moved)]
            )
            if code == -2:
                raise error or rundir.Unreadable(
                    f"a checkpoint of {self.directory} has unreadable checksums (process 0 "
                    "names it): --resume=force to override"
                )
            step = None if code < 0 else code
        else:
            step, moved = self._good_step(log, force)
        if moved:
            self.manager.close()
            self.manager = self._manager()
        return step

    def _good_step(self, log, force: bool) -> tuple[int | None, bool]:
        log = log or (lambda m: print(m, file=sys.stderr))
        moved = False
        for step in sorted(self.manager.all_steps(), reverse=True):
            path = os.path.join(self.directory, str(step))
            problem = verify(path, strict=not force)
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


def _files(step_dir: str) -> list[str]:
    out = []
    for top, _, files in os.walk(step_dir):
        out += [os.path.relpath(os.path.join(top, n), step_dir) for n in files if n != CHECKSUMS]
    return sorted(out)


def write_checksums(step_dir: str) -> None:
    sums = {rel: rundir.file_sha256(os.path.join(step_dir, rel)) for rel in _files(step_dir)}
    rundir.write_json(os.path.join(step_dir, CHECKSUMS), sums, indent=0)


def verify(step_dir: str, strict: bool = False) -> str | None:
    """What is wrong with a step directory's files against its checksums, or None. A step
    without checksums (written by an older tlx, or killed between its save and its checksums)
    passes: orbax finalised it. `strict`: checksums that cannot be read are an
    `rundir.Unreadable` error (the run's own checkpoints: nothing is moved on a guess), else
    a problem like a file that differs (another run's, read by init_from)."""
    path = os.path.join(step_dir, CHECKSUMS)
    try:
        with open(path) as f:
            sums = json.load(f)
        if not isinstance(sums, dict):
            raise ValueError(f"a {type(sums).__name__}, not a dict")
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        if strict:
            raise rundir.unreadable(path, e, "--resume=force (the step is set aside)") from None
        return f"unreadable {CHECKSUMS}: {e}"
    for rel, want in sums.items():
        path = os.path.join(step_dir, rel)
        if not os.path.exists(path):
            return f"{rel} is missing"
        if rundir.file_sha256(path) != want:
            return f"{rel} differs from its checksum"
    return None


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


def source_config(path: str) -> dict | None:
    """The config.json of the tlx run whose checkpoint `path` names (a workdir, its checkpoints/,
    a step or a state directory), or None when it is not inside a readable run directory."""
    state_dir = find_state_dir(path)
    ckpt_dir = os.path.dirname(os.path.dirname(state_dir))  # .../checkpoints/N/state
    if os.path.basename(ckpt_dir) != "checkpoints":
        return None
    try:
        return rundir.RunDir(os.path.dirname(ckpt_dir)).config()
    except rundir.Unreadable:
        return None


def check_backbone(path: str, name: str, stem: str = "") -> None:
    """An `init_from` run of another backbone (or stem) than the model's, from its config.json:
    one line naming both, before any path-by-path comparison."""
    config = source_config(path) or {}
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    theirs, their_stem = model.get("name"), model.get("stem", "")
    if theirs and theirs != name:
        raise InitError(
            f"init_from={path!r} is a {theirs} run (its config.json) and this run builds {name}: "
            f"give backbone={theirs} (--config.model.name={theirs}), or init_from a {name} run"
        )
    if theirs and (their_stem or "") != (stem or ""):
        raise InitError(
            f"init_from={path!r} is a {theirs} run with stem {their_stem or 'default'!r} and "
            f"this run's stem is {stem or 'default'!r}: give --config.model.stem={their_stem}"
        )


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
    rundir.RunDir(workdir).write(rundir.LOAD_REPORT, report)
