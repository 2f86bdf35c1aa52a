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
import numpy as np
import optax
from tqdm import tqdm

from tlx import checkpoint, data, features, freeze, models, optim, strategies
from tlx.parallel import Runner


# -- steps ---------------------------------------------------------------------------------------
def cross_entropy(logits, labels, label_smoothing: float = 0.0):
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()


def l2_sp_penalty(params, ref, labels, alpha: float, beta: float):
    """alpha/2 ||w - w0||^2 over trainable transferred leaves + beta/2 ||w||^2 over new ones."""
    total = jnp.float32(0.0)
    for w, w0, lbl in zip(
        jax.tree.leaves(params), jax.tree.leaves(ref), jax.tree.leaves(labels), strict=True
    ):
        if lbl == freeze.FROZEN:
            continue
        if optim.role(lbl) == "head":
            if beta:
                total = total + 0.5 * beta * jnp.sum(jnp.square(w))
        elif alpha:
            total = total + 0.5 * alpha * jnp.sum(jnp.square(w - w0))
    return total


def apply_updates(params, updates, labels, lr_mult=None, prox=None):
    """New params: frozen leaves carried over untouched (bit-identical); trainable ones get
    `p + m * u` (m: the leaf's LR multiplier, when the run has them). `prox` (L2-SP's proximal
    form): (alpha, beta, {label: lr}, ref): then w <- w0 + (w - w0) / (1 + lr m alpha) for
    transferred leaves and w <- w / (1 + lr m beta) for new ones."""
    flat_p, treedef = jax.tree.flatten(params)
    flat_u, flat_l = jax.tree.leaves(updates), jax.tree.leaves(labels)
    flat_m = jax.tree.leaves(lr_mult) if lr_mult is not None else [None] * len(flat_p)
    flat_r = jax.tree.leaves(prox[3]) if prox else [None] * len(flat_p)
    out = []
    for p, u, lbl, m, w0 in zip(flat_p, flat_u, flat_l, flat_m, flat_r, strict=True):
        if lbl == freeze.FROZEN:
            out.append(p)
            continue
        if m is not None:
            u = u * m
        new = p + u.astype(p.dtype)
        if prox:
            alpha, beta, lrs, _ = prox
            lr = lrs[lbl] if m is None else lrs[lbl] * m
            if optim.role(lbl) == "head":
                new = new / (1 + lr * beta) if beta else new
            elif alpha:
                new = w0 + (new - w0) / (1 + lr * alpha)
        out.append(new)
    return jax.tree.unflatten(treedef, out)


def make_train_step(
    model,
    tx,
    labels,
    label_smoothing: float = 0.0,
    axis_name=None,
    *,
    l2_sp=None,
    global_lr=None,
):
    """A step on plain pytrees. Frozen leaves are carried over untouched (bit-identical), and
    nothing here reads the whole gradient tree, so XLA prunes the backward of frozen parts.

    Optional state entries: `lr_mult` (per-leaf LR multipliers) and `l2_sp_ref` (the pre-trained
    weights w0, with `l2_sp` = {'alpha', 'beta', 'form'}; `global_lr`: label -> fn(step) for the
    proximal form)."""
    label_leaves = jax.tree.leaves(labels)
    l2_loss = l2_sp is not None and l2_sp["form"] == "loss"
    l2_prox = l2_sp is not None and l2_sp["form"] == "proximal"

    def step(state, batch):
        def loss_fn(params):
            logits, mutated = model.apply(
                {"params": params, "batch_stats": state["batch_stats"]},
                batch["image"],
                train=True,
                mutable=["batch_stats"],
            )
            loss = cross_entropy(logits, batch["label"], label_smoothing)
            total = loss
            if l2_loss:
                total = loss + l2_sp_penalty(
                    params, state["l2_sp_ref"], labels, l2_sp["alpha"], l2_sp["beta"]
                )
            return total, (loss, logits, mutated["batch_stats"])

        (_, (loss, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
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
        prox = None
        if l2_prox:
            lrs = {g: fn(state["step"]) for g, fn in global_lr.items()}
            prox = (l2_sp["alpha"], l2_sp["beta"], lrs, state["l2_sp_ref"])
        params = apply_updates(state["params"], updates, labels, state.get("lr_mult"), prox)
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
            **state,
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
    # strategy='scratch': the same run from a random init (the baseline), whatever init_from says.
    init_from = "" if config.freeze.strategy == "scratch" else config.init_from

    # -- data --
    dataset = data.load(config.data)
    steps_per_epoch = dataset.num_examples["train"] // batch_size

    # -- model, strategy (freeze phases, optimizer groups, multipliers, regulariser) --
    base_model = models.build(
        config.model.name,
        dataset.num_classes,
        stem=config.model.stem or None,
        axis_name=runner.axis_name,
    )
    dummy = jnp.zeros((1, *dataset.image_shape), jnp.float32)
    rng = jax.random.key(config.seed)
    abstract = jax.eval_shape(lambda: base_model.init(rng, dummy, train=False))
    abstract.setdefault("batch_stats", {})
    plan = strategies.plan(config, abstract, steps_per_epoch, bool(init_from))

    # -- init or restore: auto-resume first, then init_from, then scratch --
    ckpt = checkpoint.Checkpointer(workdir, config.max_to_keep)
    resumed_from = ckpt.latest_step()
    start = resumed_from or 0
    phase = plan.index(start)
    setup = plan.phases[phase]
    # The key is an argument, not a constant, so runs that differ only in seed share one compile.
    variables = jax.jit(lambda r: base_model.init(r, dummy, train=False))(rng)
    variables.setdefault("batch_stats", {})
    if resumed_from is None and init_from:
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
        "opt_state": setup.tx.init(params),
        "step": jnp.asarray(0, jnp.int32),
    }
    if plan.uses_lr_mult:
        state["lr_mult"] = strategies.initial_lr_mult(plan, params)
    if plan.l2_sp:  # w0, once on device (a copy: params and it are donated to each step)
        state["l2_sp_ref"] = jax.tree.map(np.array, params)
    cache = features.plan_cache(config, plan, dataset, base_model)
    if resumed_from is not None:
        abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        state, data_state = ckpt.restore(resumed_from, abstract_state)
    if cache is not None:  # frozen backbone, no augmentation: train the head on features
        cache.load(state, dataset, eval_batch_size)
    train_iter = (
        cache.train_iter(dataset, batch_size, config.seed)
        if cache is not None
        else dataset.train_iter(batch_size, seed=config.seed)
    )
    if resumed_from is not None:
        train_iter.set_state(data_state)
    state = runner.put_state(state)

    # -- steps (one compilation per phase) --
    def compile_phase(setup):
        model = base_model.clone(frozen_bn=setup.frozen_bn)
        smoothing = config.optim.label_smoothing
        if cache is not None:
            fn = features.make_head_step(setup.tx, setup.labels, smoothing, runner.axis_name)
        else:
            fn = make_train_step(
                model,
                setup.tx,
                setup.labels,
                smoothing,
                runner.axis_name,
                l2_sp=plan.l2_sp,
                global_lr=setup.global_lr,
            )
        grads = None
        if plan.auto_rgn:
            grads = jax.jit(
                strategies.make_grad_estimate(model.clone(axis_name=None), smoothing),
                in_shardings=(runner.replicated, runner.replicated, runner.batch_sharding),
                out_shardings=runner.replicated,
            )
        return runner.train_step(fn), grads

    train_step, grad_estimate = compile_phase(setup)
    eval_model = base_model.clone(frozen_bn=setup.frozen_bn)
    eval_step = runner.eval_step(make_eval_step(eval_model))

    def evaluate_all(step, splits):
        host = runner.get_state(state)
        variables = {"params": host["params"], "batch_stats": host["batch_stats"]}
        out = {}
        for split in splits:
            if cache is not None:
                res = cache.evaluate(runner, host["params"], split, eval_batch_size)
            else:
                res = evaluate(eval_step, runner, variables, dataset, split, eval_batch_size)
            log.write({"step": step, "split": split, **res})
            out[split] = res
        return out

    def estimate_lr_mult(state, epoch):
        """Auto-RGN: multipliers from a few batches of their own stream (the training data order
        stays that of every other strategy)."""
        seed = int(np.random.SeedSequence([config.seed, epoch, 0xA9]).generate_state(1)[0])
        it = dataset.train_iter(batch_size, seed=seed)
        batches = [runner.put_eval_batch(next(it)) for _ in range(plan.auto_rgn)]
        host = runner.get_state(state)
        static = plan.lr_mult or jax.tree.map(lambda _: 1.0, host["params"])
        host = dict(host)
        host["lr_mult"] = strategies.auto_rgn_estimate(
            grad_estimate, host["params"], host["batch_stats"], batches, setup.labels, static
        )
        return runner.put_state(jax.device_get(host))

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
        done = step - 1
        if plan.index(done) != phase:  # next phase: new groups, new step, carried state
            phase = plan.index(done)
            setup = plan.phases[phase]
            host = dict(runner.get_state(state))
            opt_state = setup.tx.init(host["params"])
            if not setup.phase.fresh:
                opt_state = optim.carry_state(opt_state, host["opt_state"])
            host["opt_state"] = opt_state
            state = runner.put_state(host)
            train_step, grad_estimate = compile_phase(setup)
        if plan.auto_rgn and done % steps_per_epoch == 0:
            state = estimate_lr_mult(state, done // steps_per_epoch)
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
            for g, lr in sorted(setup.global_lr.items()):
                record["lr" if g == "backbone" else f"lr_{g}"] = float(lr(step - 1))
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
    trainable, frozen = freeze.count(host["params"], setup.mask)
    summary = {
        **{f"{s}_accuracy": final[s]["accuracy"] for s in splits},
        **{f"{s}_loss": final[s]["loss"] for s in splits},
        "params_trainable": trainable,
        "params_frozen": frozen,
        "opt_state_bytes": tree_bytes(host["opt_state"]),
        "frozen_stages": list(setup.frozen_bn),
        "strategy": config.freeze.strategy,
        "bn_mode": plan.bn_mode,
        "phases": [
            {"start": s.phase.start, "end": s.phase.end, "frozen_stages": list(s.frozen_bn)}
            for s in plan.phases
        ],
        "init_from": init_from,
        "feature_cache": None if cache is None else cache.describe(),
        "steps": config.total_steps,
        "resumed_from": resumed_from,
        "images_per_s": statistics.median(rates) if rates else None,
        "dataset": dataset.describe(),
        "wall_s": time.time() - t_start,
    }
    # Written last and atomically: a summary.json that exists marks a finished run.
    tmp = os.path.join(workdir, "summary.json.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, os.path.join(workdir, "summary.json"))
    log.close()
    ckpt.close()
    return summary


def trained_variables(workdir: str) -> dict:
    """params and batch_stats of a finished run, as numpy (for notebooks)."""
    return checkpoint.read_variables(workdir)
