"""Checkpoints with orbax: save/auto-resume a run, and `init_from` another run's backbone.

A checkpoint step holds two items: `state` ({params, batch_stats, opt_state, step}, readable with
plain orbax) and `data` (the input iterator's position, JSON).
"""

import json
import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp

from tlx import freeze


class InitError(ValueError):
    """A checkpoint does not fit the model it is loaded into."""


class Checkpointer:
    """Saves and restores a run's state under WORKDIR/checkpoints."""

    def __init__(self, workdir: str, max_to_keep: int = 2):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, data_state: dict) -> None:
        # Orbax writes into a temporary directory and renames it when complete, so an
        # interrupted save never leaves a half-written step that a restore would read.
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

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


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
        return path
    if os.path.isdir(os.path.join(path, "state")):
        return os.path.join(path, "state")
    ckpt_dir = (
        os.path.join(path, "checkpoints")
        if os.path.isdir(os.path.join(path, "checkpoints"))
        else path
    )
    steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
    if not steps:
        raise FileNotFoundError(
            f"init_from={path!r} holds no finished checkpoint (looked in {ckpt_dir}). "
            "Did the pre-training run finish? Unfinished saves end in .orbax-checkpoint-tmp."
        )
    return os.path.join(ckpt_dir, str(steps[-1]), "state")


def read_variables(path: str) -> dict:
    """`params` and `batch_stats` (numpy) of a checkpoint, without its optimizer state."""
    state_dir = find_state_dir(path)
    ckptr = ocp.PyTreeCheckpointer()
    tree = ckptr.metadata(state_dir).item_metadata.tree
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
