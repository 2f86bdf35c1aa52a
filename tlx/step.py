"""The train and eval steps, generic over strategies: loss -> grads -> `tx.update` ->
`optax.apply_updates`. What a strategy changes lives in `tx` (frozen leaves get
`optax.set_to_zero()`, so they stay bit-identical) and in optional loss terms.
"""

import jax
import jax.numpy as jnp
import optax

from tlx import freeze


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()


def _forward(model, params, batch_stats, images):
    """Float32 logits and the new BatchNorm statistics (those the model does not use are carried
    over: a head trained on cached features has none of the backbone's). A model computing in
    bfloat16 (`config.model.dtype`) gives bf16 logits: the softmax and the loss take them in
    float32, so the loss path is as safe as in a float32 run."""
    logits, mutated = model.apply(
        {"params": params, "batch_stats": batch_stats},
        images,
        train=True,
        mutable=["batch_stats"],
    )
    return logits.astype(jnp.float32), {**batch_stats, **mutated.get("batch_stats", {})}


def make_train_step(model, tx, labels, *, loss_terms=(), label_smoothing=0.0, axis_name=None):
    """step(state, batch) -> (state, metrics) on the state {params, batch_stats, opt_state, step}.

    `labels`: the optimizer group of each leaf ('frozen' ones get no update and no gradient work:
    nothing here reads the whole gradient tree, so XLA prunes the backward of frozen parts).
    `loss_terms`: fns(params) -> scalar added to the cross-entropy. With `axis_name` (pmap) the
    trainable gradients, the loss and the accuracy are averaged over that axis."""
    trainable = [lbl != freeze.FROZEN for lbl in jax.tree.leaves(labels)]

    def step(state, batch):
        def loss_fn(params):
            logits, batch_stats = _forward(model, params, state["batch_stats"], batch["image"])
            loss = cross_entropy(logits, batch["label"], label_smoothing)
            total = loss + sum(term(params) for term in loss_terms) if loss_terms else loss
            return total, (loss, logits, batch_stats)

        (_, (loss, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"]
        )
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        if axis_name:  # pmap: average only what is trained
            flat, treedef = jax.tree.flatten(grads)
            flat = [
                jax.lax.pmean(g, axis_name) if t else g
                for g, t in zip(flat, trainable, strict=True)
            ]
            grads = jax.tree.unflatten(treedef, flat)
            loss, accuracy = jax.lax.pmean((loss, accuracy), axis_name)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        # Frozen leaves carried over as they were: bit-identical (even -0.0, which p + 0 is not),
        # and no add or copy for them in the compiled step.
        flat_new, treedef = jax.tree.flatten(params)
        flat_old = jax.tree.leaves(state["params"])
        params = jax.tree.unflatten(
            treedef, [n if t else o for n, o, t in zip(flat_new, flat_old, trainable, strict=True)]
        )
        metrics = {
            "loss": loss,
            "accuracy": accuracy,
            "grad_norm": optax.tree.norm(
                [g for g, t in zip(jax.tree.leaves(grads), trainable, strict=True) if t]
            ),
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
        logits = model.apply(variables, batch["image"], train=False).astype(jnp.float32)
        mask = batch["mask"]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        correct = jnp.argmax(logits, -1) == batch["label"]
        return {
            "correct": jnp.sum(correct * mask),
            "loss": jnp.sum(loss * mask),
            "count": jnp.sum(mask),
        }

    return step


def make_grad_fn(model, label_smoothing: float = 0.0):
    """fn(params, batch_stats, batch) -> the gradient of the mean loss on `batch`, every leaf: for
    estimates between steps (Auto-RGN), not the step (it reads the whole gradient tree)."""

    def grads(params, batch_stats, batch):
        def loss_fn(p):
            logits, _ = _forward(model, p, batch_stats, batch["image"])
            return cross_entropy(logits, batch["label"], label_smoothing)

        return jax.grad(loss_fn)(params)

    return grads
