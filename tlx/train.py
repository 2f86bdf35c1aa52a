"""One train loop for pre-training and fine-tuning: `run(config, workdir) -> summary`.

Read top to bottom: workdir, data, model and strategy plan, init or restore, the feature cache,
steps, loop (hook, step, log, evaluate, checkpoint), final evaluation and summary. What a
strategy changes is in its plan (`tlx.strategies`); the step is generic (`tlx.step`).
"""

import contextlib
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from tlx import (
    checkpoint,
    data,
    distributed,
    features,
    fewshot,
    freeze,
    models,
    parallel,
    provenance,
    rundir,
    strategies,
)
from tlx import config as tlx_config
from tlx import step as step_lib


class NonFiniteError(RuntimeError):
    """The loss or a parameter went non-finite: the run stopped, its finite checkpoints kept."""


def run(config, workdir: str, resume: str = "auto") -> dict:
    """Train (or resume) the run `config` in `workdir`; returns the summary it writes.

    A workdir holds one run: resuming it with another config is refused unless resume='force'
    (the change is recorded in config.json's resume_history); a finished run asked again with
    its config is not trained again (its summary is returned). One process per workdir, or one
    multi-process job (`tlx.distributed`): every process calls `run` with the same config, and
    process 0 writes the directory's files."""
    t_start = time.time()
    if not str(workdir).strip():
        raise ValueError("workdir is empty: give the run directory (--workdir=DIR)")
    tlx_config.validate(config)
    # Before anything is written: a batch the devices (of all processes) cannot split.
    parallel.check_batch_size(config.batch_size)
    parallel.check_batch_size(config.eval_batch_size or config.batch_size, "eval_batch_size")
    distributed.check_same(rundir.comparable(json.loads(config.to_json_best_effort())))
    workdir = os.path.abspath(workdir)
    with rundir.lock(workdir, process=jax.process_index()):
        return _run(config, workdir, resume, t_start)


def _run(config, workdir: str, resume: str, t_start: float) -> dict:
    tree = json.loads(config.to_json_best_effort())
    ckpt = checkpoint.Checkpointer(workdir, config.max_to_keep)
    resumed_from = ckpt.good_step()
    finished = _read_json(os.path.join(workdir, "summary.json"))
    failed = _read_json(os.path.join(workdir, FAILED))
    where = (
        os.path.join(ckpt.directory, str(resumed_from))
        if resumed_from is not None
        else (workdir if finished is not None else None)
    )
    history, changed = checkpoint.check_resume(workdir, tree, where, resume, tlx_config.migrate)
    if not changed and finished is not None:
        print(f"[tlx] {workdir}: finished before with this config; nothing to do", file=sys.stderr)
        ckpt.close()
        return finished
    if not changed and (failed or {}).get("status") == "diverged" and resumed_from is not None:
        ckpt.close()
        raise NonFiniteError(
            f"{failed['error']} (diverged before with this config; nothing to do: give another "
            "config with --resume=force to continue from the last finite checkpoint)"
        )
    if resumed_from is not None and resumed_from > config.total_steps:
        ckpt.close()
        raise checkpoint.ResumeMismatch(
            f"cannot resume {where}: its step {resumed_from} is past total_steps="
            f"{config.total_steps}; use a new workdir"
        )
    distributed.barrier("tlx_run_read")  # every process has read the directory: now rewrite it
    splits = ("train", "val", "test") if config.eval_train else ("val", "test")
    if distributed.is_main():
        for name in ("summary.json", FAILED):  # the run is not finished (nor failed) any more
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(workdir, name))
        if history:
            tree["resume_history"] = history
        _write_json(os.path.join(workdir, "config.json"), tree)
        checkpoint.truncate_metrics(
            os.path.join(workdir, "metrics.jsonl"),
            resumed_from or 0,
            splits if resumed_from == config.total_steps else (),
        )
    try:
        return _train(config, workdir, ckpt, resumed_from, splits, t_start)
    except BaseException as e:
        status = "diverged" if isinstance(e, NonFiniteError) else "failed"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if distributed.is_main():
            _write_json(
                os.path.join(workdir, FAILED),
                {"status": status, "error": first, "type": type(e).__name__, "time": time.ctime()},
            )
        raise
    finally:
        ckpt.close()


def _train(config, workdir, ckpt, resumed_from, splits, t_start) -> dict:
    runner = parallel.Runner(config.parallel)
    batch_size, eval_batch_size = config.batch_size, config.eval_batch_size or config.batch_size

    # -- data --
    dataset = data.load(config.data)
    steps_per_epoch = dataset.num_examples["train"] // batch_size

    # -- model, strategy plan (phases, optimizer groups, transforms, hook) --
    model = models.build(
        config.model.name,
        dataset.num_classes,
        stem=config.model.stem or None,
        axis_name=runner.axis_name,
        dtype=models.compute_dtype(config.model.get("dtype", "float32")),
    )
    dummy = jnp.zeros((1, *dataset.image_shape), jnp.float32)
    rng = jax.random.key(config.seed)
    abstract = jax.eval_shape(lambda: model.init(rng, dummy, train=False))
    abstract.setdefault("batch_stats", {})
    init_from = "" if strategies.get(config.strategy.name).from_scratch else config.init_from
    plan = strategies.plan(config, abstract, steps_per_epoch, bool(init_from))

    # -- init or restore: auto-resume first, then init_from, then scratch --
    start = resumed_from or 0
    # A checkpoint saved on a phase boundary holds the state of the phase before it.
    phase = plan.index(max(start - 1, 0))
    # The key is an argument, not a constant, so runs that differ only in seed share one compile.
    variables = jax.jit(lambda r: model.init(r, dummy, train=False))(rng)
    variables.setdefault("batch_stats", {})
    if resumed_from is None and init_from:
        source, source_name = load_source(config)
        variables, report = checkpoint.merge(
            dict(variables), source, list(config.init_reinit), config.init_reinit_init, source_name
        )
        stages = models.stage_names(config.model.name)  # the freeze-depth axis of the backbone
        depth = models.depth_of(stages, plan.phases[0].frozen_bn)
        report.update(stages=list(stages), freeze_depth=depth)
        if distributed.is_main():
            checkpoint.write_report(workdir, report)
            print(
                f"[tlx] {config.model.name}: stages {', '.join(stages)} (freeze depth "
                f"0..{len(stages) - 1}); this run starts at depth {depth}",
                file=sys.stderr,
            )
    state = plan.init_state(variables, phase)
    data_state = None
    if resumed_from is not None:
        state, data_state = ckpt.restore(resumed_from, jax.tree.map(_abstract, state))

    probe = None  # few-shot probes on other targets while the backbone trains
    if config.fewshot.every and config.fewshot.targets:
        probe = fewshot.make_fewshot_evaluator(config, plan.model(model, phase))

    # -- the frozen-prefix cache: with no augmentation the rest trains on stage k's output --
    cache = None
    if features.applies(config, plan, dataset):  # computed by process 0, read by the others
        image_dataset, image_model = dataset, model
        if distributed.is_main():
            dataset, model, cache = features.cached(
                config, dataset, model, state, eval_batch_size, plan
            )
        distributed.barrier("tlx_feature_cache")
        if not distributed.is_main():
            dataset, model, cache = features.cached(
                config, image_dataset, image_model, state, eval_batch_size, plan
            )
    train_iter = dataset.train_iter(
        batch_size,
        seed=config.seed,
        process_index=runner.process_index,
        process_count=runner.process_count,
    )
    if data_state is not None:
        train_iter.set_state(data_state)
    _check_finite_start(state["params"], config)
    state = runner.put_state(state)

    def compiled_step(phase):  # one compilation per phase
        step_fn = plan.train_step(model, phase, runner.axis_name)
        return runner.train_step(_guarded(step_fn, plan.phases[phase].mask))

    train_step = compiled_step(phase)
    eval_step = runner.eval_step(step_lib.make_eval_step(plan.model(model, phase)))
    log = _Log(workdir, config.tensorboard) if distributed.is_main() else _NoLog()

    # -- loop --
    rates, t_log, n_log, pending = [], time.time(), 0, None
    bar = tqdm(
        total=config.total_steps,
        initial=start,
        disable=not config.progress or not distributed.is_main(),
        desc=os.path.basename(workdir),
        dynamic_ncols=True,
    )
    for step in range(start + 1, config.total_steps + 1):
        done = step - 1
        if plan.index(done) != phase:  # next phase: new groups, new step, carried state
            phase = plan.index(done)
            state = runner.put_state(plan.enter(dict(runner.get_state(state)), phase))
            train_step = compiled_step(phase)
        setup = plan.phases[phase]
        if plan.hook is not None:
            info = strategies.StepInfo(
                done, phase, setup, plan.model(model, phase), plan.lr_mult, dataset, runner,
                batch_size, steps_per_epoch, config.seed, config.optim.label_smoothing,
            )  # fmt: skip
            state = plan.hook(info, state)
        state, metrics = train_step(state, runner.put_batch(next(train_iter)))
        n_log += 1
        bar.update(1)
        logs = step % config.log_every == 0 or step == config.total_steps
        probes = probe is not None and step % config.fewshot.every == 0
        evals = config.eval_every and step % config.eval_every == 0 and step != config.total_steps
        saves = config.checkpoint_every and step % config.checkpoint_every == 0
        # Checked one step late (the device runs ahead), or now before the host reads the state.
        if logs or probes or evals or saves:
            _check_finite(step, metrics, runner, ckpt, config)
        elif pending is not None:
            _check_finite(*pending, runner, ckpt, config)
        pending = (step, metrics)
        if logs:
            m = runner.metrics(metrics)
            del m["finite_loss"], m["finite_params"]
            now = time.time()
            rate = n_log * batch_size / (now - t_log)
            if step > start + n_log:  # the first interval includes compilation
                rates.append(rate)
            t_log, n_log = now, 0
            record = {"step": step, **m, "images_per_s": rate}
            for g, lr in sorted(setup.global_lr.items()):
                record["lr" if g == "backbone" else f"lr_{g}"] = float(lr(step - 1))
            log.write(record)
            bar.set_postfix(loss=f"{m['loss']:.3f}")
        if probes:
            host = runner.get_state(state)
            log.write(
                {
                    "step": step,
                    "split": "fewshot",
                    **probe(step, host["params"], host["batch_stats"]),
                }
            )
        if evals:
            _evaluate(eval_step, runner, state, dataset, ("val",), eval_batch_size, step, log)
        if saves:
            ckpt.save(step, runner.save_state(state), train_iter.get_state())
            if os.environ.get(PAUSE_AFTER_SAVE) == str(step):
                _pause(ckpt, workdir, step)
    bar.close()
    if pending is not None:
        _check_finite(*pending, runner, ckpt, config)
    if ckpt.latest_step() != config.total_steps:
        ckpt.save(config.total_steps, runner.save_state(state), train_iter.get_state())
    ckpt.wait()

    # -- final evaluation and summary --
    final = _evaluate(
        eval_step, runner, state, dataset, splits, eval_batch_size, config.total_steps, log
    )
    summary = _summary(config, plan, runner.get_state(state), final, dataset, cache)
    summary.update(
        init_from=init_from,
        resumed_from=resumed_from,
        images_per_s=statistics.median(rates) if rates else None,
        wall_s=time.time() - t_start,
        provenance=provenance.collect(),
        topology=distributed.describe(),
    )
    # Written last and atomically: a summary.json that exists marks a finished run.
    if distributed.is_main():
        _write_json(os.path.join(workdir, "summary.json"), summary)
    log.close()
    distributed.barrier("tlx_run_done")
    return summary


def _guarded(step_fn, mask):
    """`step_fn` whose metrics also say whether the loss and every trained parameter are finite.
    `mask`: the phase's frozen leaves (True), which the step carries over as they were: checked
    once before training (`_check_finite_start`), not every step, so the compiled step touches
    no frozen leaf."""
    trained = [not m for m in jax.tree.leaves(mask)]

    def step(state, batch):
        new, metrics = step_fn(state, batch)
        flat = jax.tree.leaves(new["params"])
        leaves = [x for x, t in zip(flat, trained, strict=True) if t]
        finite = jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]).all() if leaves else True
        return new, {
            **metrics,
            "finite_loss": jnp.isfinite(metrics["loss"]).astype(jnp.float32),
            "finite_params": jnp.asarray(finite, jnp.float32),
        }

    return step


def _check_finite_start(params, config) -> None:
    """Every parameter finite before the first step (the frozen ones are never checked again)."""
    bad = [
        freeze.path_str(p)
        for p, x in jax.tree_util.tree_leaves_with_path(params)
        if not np.all(np.isfinite(np.asarray(x)))
    ]
    if bad:
        source = f"init_from={config.init_from!r}" if config.init_from else "the initial state"
        raise checkpoint.InitError(
            f"{source} has non-finite values in {len(bad)} parameter(s) ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}): it is corrupt or from a diverged run; start "
            "from a finite checkpoint"
        )


def _check_finite(step, metrics, runner, ckpt, config) -> None:
    m = runner.metrics({k: metrics[k] for k in ("loss", "finite_loss", "finite_params")})
    if m["finite_loss"] == 1.0 and m["finite_params"] == 1.0:
        return
    what = (
        f"the training loss is {m['loss']}"
        if m["finite_loss"] != 1.0
        else "an update made parameters non-finite"
    )
    last = ckpt.latest_step()
    kept = f"its last finite checkpoint, step {last}, is kept" if last else "no checkpoint kept"
    raise NonFiniteError(
        f"step {step}: {what} (optim.lr={config.optim.lr}, optim.head_lr={config.optim.head_lr}); "
        f"the run stopped, {kept}: lower the learning rate or set optim.clip_norm"
    )


# For kill -9 tests (tests/test_resume.py): after saving this step, wait for the save, write
# WORKDIR/.paused and sleep, so that the test's SIGKILL lands at a known point.
PAUSE_AFTER_SAVE = "TLX_TEST_PAUSE_AFTER_SAVE"


def _pause(ckpt, workdir: str, step: int) -> None:
    ckpt.wait()
    index = jax.process_index()
    with open(os.path.join(workdir, ".paused" + (f".{index}" if index else "")), "w") as f:
        f.write(str(step))
    while True:
        time.sleep(60)


FAILED = "failed.json"  # a run that stopped with an error says so: {status, error, type, time}


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _summary(config, plan, host, final, dataset, cache) -> dict:
    """The final figures of a run (summary.json), without its timing and provenance."""
    last = plan.phases[-1]
    trainable, frozen = freeze.count(host["params"], last.mask)
    return {
        **{f"{s}_accuracy": r["accuracy"] for s, r in final.items()},
        **{f"{s}_loss": r["loss"] for s, r in final.items()},
        "params_trainable": trainable,
        "params_frozen": frozen,
        "opt_state_bytes": tree_bytes(host["opt_state"]),
        "frozen_stages": list(last.frozen_bn),
        "strategy": config.strategy.name,
        "bn_mode": plan.bn_mode,
        "phases": [
            {"start": s.phase.start, "end": s.phase.end, "frozen_stages": list(s.frozen_bn)}
            for s in plan.phases
        ],
        "feature_cache": cache,
        "steps": config.total_steps,
        "dataset": dataset.describe(),
    }


def _abstract(x):
    # Restored onto this process's first device, whatever mesh saved it: a run resumes on
    # another topology (1 process x 4 devices <-> 2 x 2), and put_state places it from there.
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x), sharding=local)


def _evaluate(eval_step, runner, state, dataset, splits, batch_size, step, log) -> dict:
    """Accuracy, mean loss and count of each split (padding rows masked out), logged."""
    host = runner.get_state(state)
    variables = {"params": host["params"], "batch_stats": host["batch_stats"]}
    out = {}
    rows = runner.local_rows(batch_size)  # this process's rows of each global batch
    for split in splits:
        sums = {"correct": 0.0, "loss": 0.0, "count": 0.0}
        for batch in dataset.eval_batches(split, batch_size):
            batch = {k: v[rows] for k, v in batch.items()}
            res = jax.device_get(eval_step(variables, runner.put_eval_batch(batch)))
            for k in sums:
                sums[k] += float(res[k])
        n = max(sums["count"], 1.0)
        out[split] = {"accuracy": sums["correct"] / n, "loss": sums["loss"] / n, "examples": int(n)}
        log.write({"step": step, "split": split, **out[split]})
    return out


def load_source(config) -> tuple[dict, str]:
    """Variables of the run's `init_from`: a named pretrained source or a checkpoint path."""
    if config.init_from in ("imagenet",):
        try:
            from tlx.convert import pretrained
        except ImportError as e:  # pragma: no cover - depends on the optional extra
            raise ValueError(
                "init_from='imagenet' needs tlx.convert (see README: pretrained weights)"
            ) from e
        src = pretrained.load_pretrained(
            config.model.name, config.init_from, weights_path=config.pretrained_path
        )
        return src, f"{config.init_from}:{config.model.name}"
    return checkpoint.read_variables(config.init_from), checkpoint.find_state_dir(config.init_from)


def tree_bytes(tree) -> int:
    return int(sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes")))


class _NoLog:
    """The log of a process other than 0: it writes nothing."""

    def write(self, record: dict):
        pass

    def close(self):
        pass


class _Log:
    """metrics.jsonl (+ TensorBoard event files when tensorboardX is there); process 0 only."""

    def __init__(self, workdir, tensorboard: bool):
        self.file = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115
        self.tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                pass
            else:
                self.tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, record: dict):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            prefix = record.get("split", "train")
            for k, v in record.items():
                if k not in ("step", "split") and isinstance(v, int | float):
                    self.tb.add_scalar(f"{prefix}/{k}", v, record["step"])

    def close(self):
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def trained_variables(workdir: str) -> dict:
    """params and batch_stats of a finished run, as numpy (for notebooks)."""
    return checkpoint.read_variables(workdir)
