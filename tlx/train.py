"""One train loop for pre-training and fine-tuning: `run(config, workdir) -> summary`.

Read top to bottom: workdir, data, model and strategy plan, init or restore, the feature cache,
steps, loop (hook, step, log, evaluate, checkpoint), final evaluation and summary. What a
strategy changes is in its plan (`tlx.strategies`); the step is generic (`tlx.step`).
"""

import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
from tqdm import tqdm

from tlx import checkpoint, data, features, fewshot, freeze, models, strategies
from tlx import step as step_lib
from tlx.parallel import Runner


def run(config, workdir: str) -> dict:
    """Train (or resume) the run `config` in `workdir`; returns the summary it writes."""
    t_start = time.time()
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=1))
    runner = Runner(config.parallel)
    batch_size, eval_batch_size = config.batch_size, config.eval_batch_size or config.batch_size
    runner.check_batch_size(batch_size)
    runner.check_batch_size(eval_batch_size, "eval_batch_size")

    # -- data --
    dataset = data.load(config.data)
    steps_per_epoch = dataset.num_examples["train"] // batch_size

    # -- model, strategy plan (phases, optimizer groups, transforms, hook) --
    model = models.build(
        config.model.name,
        dataset.num_classes,
        stem=config.model.stem or None,
        axis_name=runner.axis_name,
    )
    dummy = jnp.zeros((1, *dataset.image_shape), jnp.float32)
    rng = jax.random.key(config.seed)
    abstract = jax.eval_shape(lambda: model.init(rng, dummy, train=False))
    abstract.setdefault("batch_stats", {})
    init_from = "" if strategies.get(config.strategy.name).from_scratch else config.init_from
    plan = strategies.plan(config, abstract, steps_per_epoch, bool(init_from))

    # -- init or restore: auto-resume first, then init_from, then scratch --
    ckpt = checkpoint.Checkpointer(workdir, config.max_to_keep)
    resumed_from = ckpt.latest_step()
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
        checkpoint.write_report(workdir, report)
    state = plan.init_state(variables, phase)
    data_state = None
    if resumed_from is not None:
        state, data_state = ckpt.restore(resumed_from, jax.tree.map(_abstract, state))

    probe = None  # few-shot probes on other targets while the backbone trains
    if config.fewshot.every and config.fewshot.targets:
        probe = fewshot.make_fewshot_evaluator(config, model)

    # -- the feature cache: a frozen backbone with no augmentation trains its head on features --
    cache = None
    if features.applies(config, plan, dataset):
        dataset, model, cache = features.cached(config, dataset, model, state, eval_batch_size)
    train_iter = dataset.train_iter(batch_size, seed=config.seed)
    if data_state is not None:
        train_iter.set_state(data_state)
    state = runner.put_state(state)
    train_step = runner.train_step(plan.train_step(model, phase, runner.axis_name))
    eval_step = runner.eval_step(step_lib.make_eval_step(plan.model(model, phase)))
    log = _Log(workdir, config.tensorboard)

    # -- loop --
    rates, t_log, n_log = [], time.time(), 0
    bar = tqdm(
        total=config.total_steps,
        initial=start,
        disable=not config.progress,
        desc=os.path.basename(workdir),
        dynamic_ncols=True,
    )
    for step in range(start + 1, config.total_steps + 1):
        done = step - 1
        if plan.index(done) != phase:  # next phase: new groups, new step, carried state
            phase = plan.index(done)
            state = runner.put_state(plan.enter(dict(runner.get_state(state)), phase))
            train_step = runner.train_step(plan.train_step(model, phase, runner.axis_name))
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
        if step % config.log_every == 0 or step == config.total_steps:
            m = runner.metrics(metrics)
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
        if probe is not None and step % config.fewshot.every == 0:
            host = runner.get_state(state)
            log.write(
                {
                    "step": step,
                    "split": "fewshot",
                    **probe(step, host["params"], host["batch_stats"]),
                }
            )
        if config.eval_every and step % config.eval_every == 0 and step != config.total_steps:
            _evaluate(eval_step, runner, state, dataset, ("val",), eval_batch_size, step, log)
        if config.checkpoint_every and step % config.checkpoint_every == 0:
            ckpt.save(step, runner.get_state(state), train_iter.get_state())
    bar.close()
    if ckpt.latest_step() != config.total_steps:
        ckpt.save(config.total_steps, runner.get_state(state), train_iter.get_state())
    ckpt.wait()

    # -- final evaluation and summary --
    splits = ("train", "val", "test") if config.eval_train else ("val", "test")
    final = _evaluate(
        eval_step, runner, state, dataset, splits, eval_batch_size, config.total_steps, log
    )
    summary = _summary(config, plan, runner.get_state(state), final, dataset, cache)
    summary.update(
        init_from=init_from,
        resumed_from=resumed_from,
        images_per_s=statistics.median(rates) if rates else None,
        wall_s=time.time() - t_start,
    )
    # Written last and atomically: a summary.json that exists marks a finished run.
    tmp = os.path.join(workdir, "summary.json.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, os.path.join(workdir, "summary.json"))
    log.close()
    ckpt.close()
    return summary


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
    return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))


def _evaluate(eval_step, runner, state, dataset, splits, batch_size, step, log) -> dict:
    """Accuracy, mean loss and count of each split (padding rows masked out), logged."""
    host = runner.get_state(state)
    variables = {"params": host["params"], "batch_stats": host["batch_stats"]}
    out = {}
    for split in splits:
        sums = {"correct": 0.0, "loss": 0.0, "count": 0.0}
        for batch in dataset.eval_batches(split, batch_size):
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


class _Log:
    """metrics.jsonl (+ TensorBoard event files when tensorboardX is there)."""

    def __init__(self, workdir, tensorboard: bool):
        self.file = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115
        self.tb = None
        if tensorboard and jax.process_index() == 0:
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
