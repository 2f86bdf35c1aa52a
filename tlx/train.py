"""One train loop for pre-training and fine-tuning: `run(config, workdir) -> summary`.

Read top to bottom: workdir, data, model, freeze spec and optimizer, init or restore, steps,
loop (log, evaluate, checkpoint), final evaluation and summary.
"""

import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from tqdm import tqdm

from tlx import checkpoint, data, freeze, models, optim
from tlx.parallel import Runner


# -- steps ---------------------------------------------------------------------------------------
def make_train_step(model, tx, labels, label_smoothing: float = 0.0, axis_name=None):
    """A step on plain pytrees. Frozen leaves are carried over untouched (bit-identical), and
    nothing here reads the whole gradient tree, so XLA prunes the backward of frozen parts."""
    label_leaves = jax.tree.leaves(labels)

    def step(state, batch):
        def loss_fn(params):
            logits, mutated = model.apply(
                {"params": params, "batch_stats": state["batch_stats"]},
                batch["image"],
                train=True,
                mutable=["batch_stats"],
            )
            targets = jax.nn.one_hot(batch["label"], logits.shape[-1])
            if label_smoothing:
                targets = optax.smooth_labels(targets, label_smoothing)
            loss = optax.softmax_cross_entropy(logits, targets).mean()
            return loss, (logits, mutated["batch_stats"])

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"]
        )
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        if axis_name:  # pmap: average only what is trained
            grads = jax.tree.map(
                lambda g, lbl: g if lbl == freeze.FROZEN else jax.lax.pmean(g, axis_name),
                grads,
                labels,
            )
            loss, accuracy = jax.lax.pmean((loss, accuracy), axis_name)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = jax.tree.map(
            lambda p, u, lbl: p if lbl == freeze.FROZEN else p + u.astype(p.dtype),
            state["params"],
            updates,
            labels,
        )
        trainable_grads = [
            g
            for g, lbl in zip(jax.tree.leaves(grads), label_leaves, strict=True)
            if lbl != freeze.FROZEN
        ]
        metrics = {
            "loss": loss,
            "accuracy": accuracy,
            "grad_norm": optax.tree.norm(trainable_grads),
        }
        new_state = {
            "params": params,
            "batch_stats": batch_stats,
            "opt_state": opt_state,
            "step": state["step"] + 1,
        }
        return new_state, metrics

    return step


def make_eval_step(model):
    def step(variables, batch):
        logits = model.apply(variables, batch["image"], train=False)
        mask = batch["mask"]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        correct = jnp.argmax(logits, -1) == batch["label"]
        return {
            "correct": jnp.sum(correct * mask),
            "loss": jnp.sum(loss * mask),
            "count": jnp.sum(mask),
        }

    return step


def evaluate(eval_step, runner, variables, dataset, split, batch_size) -> dict:
    sums = {"correct": 0.0, "loss": 0.0, "count": 0.0}
    for batch in dataset.eval_batches(split, batch_size):
        out = jax.device_get(eval_step(variables, runner.put_eval_batch(batch)))
        for k in sums:
            sums[k] += float(out[k])
    n = max(sums["count"], 1.0)
    return {"accuracy": sums["correct"] / n, "loss": sums["loss"] / n, "examples": int(n)}


# -- init ----------------------------------------------------------------------------------------
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


# -- the run -------------------------------------------------------------------------------------
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


def run(config, workdir: str) -> dict:
    """Train (or resume) the run `config` in `workdir`; returns the summary it writes."""
    t_start = time.time()
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=1))
    runner = Runner(config.parallel)
    batch_size = config.batch_size
    eval_batch_size = config.eval_batch_size or batch_size
    runner.check_batch_size(batch_size)
    runner.check_batch_size(eval_batch_size, "eval_batch_size")

    # -- data --
    dataset = data.load(config.data)

    # -- model, freeze spec, optimizer --
    model = models.build(
        config.model.name,
        dataset.num_classes,
        stem=config.model.stem or None,
        axis_name=runner.axis_name,
    )
    dummy = jnp.zeros((1, *dataset.image_shape), jnp.float32)
    rng = jax.random.key(config.seed)
    abstract = jax.eval_shape(lambda: model.init(rng, dummy, train=False))
    mask = freeze.frozen_mask(config.freeze, abstract["params"])
    model = model.clone(frozen_bn=freeze.frozen_stages(config.freeze, abstract["params"]))
    new_patterns = list(config.init_reinit) if config.init_from else []
    labels = optim.group_labels(abstract["params"], mask, new_patterns)
    tx, schedules = optim.make(config.optim, labels, config.total_steps)

    # -- init or restore: auto-resume first, then init_from, then scratch --
    variables = jax.jit(lambda: model.init(rng, dummy, train=False))()
    variables.setdefault("batch_stats", {})
    ckpt = checkpoint.Checkpointer(workdir, config.max_to_keep)
    train_iter = dataset.train_iter(batch_size, seed=config.seed)
    resumed_from = ckpt.latest_step()
    if resumed_from is None and config.init_from:
        source, source_name = load_source(config)
        variables, report = checkpoint.merge(
            dict(variables),
            source,
            list(config.init_reinit),
            config.init_reinit_init,
            source_name,
        )
        checkpoint.write_report(workdir, report)
    params = variables["params"]
    state = {
        "params": params,
        "batch_stats": variables["batch_stats"],
        "opt_state": tx.init(params),
        "step": jnp.asarray(0, jnp.int32),
    }
    if resumed_from is not None:
        abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        state, data_state = ckpt.restore(resumed_from, abstract_state)
        train_iter.set_state(data_state)
    start = int(state["step"])
    state = runner.put_state(state)

    # -- steps --
    train_step = runner.train_step(
        make_train_step(model, tx, labels, config.optim.label_smoothing, runner.axis_name)
    )
    eval_step = runner.eval_step(make_eval_step(model))

    def evaluate_all(step, splits):
        host = runner.get_state(state)
        variables = {"params": host["params"], "batch_stats": host["batch_stats"]}
        out = {}
        for split in splits:
            res = evaluate(eval_step, runner, variables, dataset, split, eval_batch_size)
            log.write({"step": step, "split": split, **res})
            out[split] = res
        return out

    # -- loop --
    log = _Log(workdir, config.tensorboard)
    rates = []
    t_log, n_log = time.time(), 0
    bar = tqdm(
        total=config.total_steps,
        initial=start,
        disable=not config.progress,
        desc=os.path.basename(workdir),
        dynamic_ncols=True,
    )
    for step in range(start + 1, config.total_steps + 1):
        batch = next(train_iter)
        state, metrics = train_step(state, runner.put_batch(batch))
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
            for g, sched in schedules.items():
                record["lr" if g == "backbone" else f"lr_{g}"] = float(sched(step - 1))
            log.write(record)
            bar.set_postfix(loss=f"{m['loss']:.3f}")
        if config.eval_every and step % config.eval_every == 0 and step != config.total_steps:
            evaluate_all(step, ("val",))
        if config.checkpoint_every and step % config.checkpoint_every == 0:
            ckpt.save(step, runner.get_state(state), train_iter.get_state())
    bar.close()
    if ckpt.latest_step() != config.total_steps:
        ckpt.save(config.total_steps, runner.get_state(state), train_iter.get_state())
    ckpt.wait()

    # -- final evaluation and summary --
    splits = ("train", "val", "test") if config.eval_train else ("val", "test")
    final = evaluate_all(config.total_steps, splits)
    host = runner.get_state(state)
    trainable, frozen = freeze.count(host["params"], mask)
    summary = {
        **{f"{s}_accuracy": final[s]["accuracy"] for s in splits},
        **{f"{s}_loss": final[s]["loss"] for s in splits},
        "params_trainable": trainable,
        "params_frozen": frozen,
        "opt_state_bytes": tree_bytes(host["opt_state"]),
        "frozen_stages": list(model.frozen_bn),
        "strategy": config.freeze.strategy,
        "steps": config.total_steps,
        "resumed_from": resumed_from,
        "images_per_s": statistics.median(rates) if rates else None,
        "dataset": dataset.describe(),
        "wall_s": time.time() - t_start,
    }
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    log.close()
    ckpt.close()
    return summary


def trained_variables(workdir: str) -> dict:
    """params and batch_stats of a finished run, as numpy (for notebooks)."""
    return checkpoint.read_variables(workdir)
