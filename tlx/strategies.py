"""A run's fine-tuning strategy as data: its phases (which leaves train in which step range, in
which optimizer groups, at which LR), its per-leaf LR multipliers and its regulariser.

`plan(config, variables, steps_per_epoch)` reads `config.freeze` (the strategy and its knobs) and
`config.optim`; `tlx.train` follows the plan. Each phase is one optimizer and one compilation.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tlx import freeze, optim


@dataclasses.dataclass
class PhaseSetup:
    phase: freeze.Phase
    mask: dict  # True = frozen
    labels: dict  # optimizer group per leaf
    tx: optax.GradientTransformation
    global_lr: dict  # label -> LR of the update that follows `t` done updates (t = global step)
    frozen_bn: tuple[str, ...]


@dataclasses.dataclass
class Plan:
    strategy: str
    bn_mode: str
    phases: list[PhaseSetup]
    lr_mult: dict | None  # static per-leaf multipliers (Python floats), None when all are 1
    auto_rgn: int  # batches per Auto-RGN estimate, 0 = off
    l2_sp: dict | None  # {'alpha', 'beta', 'form'} when the L2-SP term is on

    def index(self, done_steps: int) -> int:
        return freeze.phase_at([s.phase for s in self.phases], done_steps)

    @property
    def uses_lr_mult(self) -> bool:
        return self.lr_mult is not None or bool(self.auto_rgn)


def plan(config, variables, steps_per_epoch: int, from_checkpoint: bool) -> Plan:
    """The plan of `config` on a model with (abstract) `variables`."""
    spec, ocfg = config.freeze, config.optim
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    freeze.check(spec)
    phases = freeze.phases(spec, params, config.total_steps, steps_per_epoch)
    reinit = list(config.init_reinit) if from_checkpoint else []
    lrs = optim.group_lrs(ocfg)
    setups, since, segment = [], None, None
    for k, phase in enumerate(phases):
        mask = freeze.frozen_mask(spec, params, list(phase.patterns), batch_stats)
        if phase.fresh:  # a new optimizer, its schedules over [start, next fresh phase)
            end = next((p.start for p in phases[k + 1 :] if p.fresh), config.total_steps)
            segment = (
                k,
                phase.start,
                {r: optim.schedule(ocfg, lr, end - phase.start) for r, lr in lrs.items()},
            )
            since = jax.tree.map(lambda m, k=k: -1 if m else k, mask)
        else:  # carry on: a leaf trainable for the first time gets the group of phase k
            since = jax.tree.map(lambda s, m, k=k: s if s >= 0 or m else k, since, mask)
        k0, s0, role_schedule = segment
        tags = jax.tree.map(lambda s, k0=k0: 0 if s in (-1, k0) else s, since)
        new = reinit if phase.head_is_new else []
        labels = optim.group_labels(params, mask, new, tags)
        schedules, global_lr = {}, {}
        for label in set(jax.tree.leaves(labels)) - {freeze.FROZEN}:
            sched = role_schedule[optim.role(label)]
            created = phases[int(label.split(":p")[1])].start if ":p" in label else s0
            schedules[label] = _shifted(sched, created - s0)
            global_lr[label] = _shifted(sched, -s0)
        setups.append(
            PhaseSetup(
                phase=phase,
                mask=mask,
                labels=labels,
                tx=optim.build(ocfg, labels, schedules),
                global_lr=global_lr,
                frozen_bn=freeze.frozen_stages(spec, params, list(phase.patterns)),
            )
        )
    mults = []
    if spec.strategy == "layer_decay":
        mults.append(optim.layer_decay_multipliers(params, spec.layer_decay.decay))
    if ocfg.lr_mults:
        mults.append(optim.regex_multipliers(params, ocfg.lr_mults))
    lr_mult = optim.combine(*mults) if mults else None
    if lr_mult is not None and optim.is_trivial(lr_mult):
        lr_mult = None
    l2 = spec.l2_sp.to_dict() if spec.strategy == "l2_sp" else None
    if l2 is not None and not (l2["alpha"] or l2["beta"]):
        l2 = None  # alpha = beta = 0 is plain fine-tuning, bit for bit: no term at all
    return Plan(
        strategy=spec.strategy,
        bn_mode=freeze.bn_mode(spec),
        phases=setups,
        lr_mult=lr_mult,
        auto_rgn=int(spec.auto_rgn.batches) if spec.strategy == "auto_rgn" else 0,
        l2_sp=l2,
    )


def _shifted(sched, offset: int):
    return sched if offset == 0 else (lambda count: sched(count + offset))


def initial_lr_mult(plan_: Plan, params) -> dict:
    """The `state['lr_mult']` a run starts with: the static multipliers (1 where there are none)."""
    static = plan_.lr_mult or jax.tree.map(lambda _: 1.0, params)
    return jax.tree.map(lambda m: np.asarray(m, np.float32), static)


def make_grad_estimate(model, label_smoothing: float = 0.0):
    """fn(params, batch_stats, batch) -> the gradient of the mean loss on `batch` (every leaf);
    for Auto-RGN only, once per epoch: it reads the whole gradient tree, so it is not the step."""

    def grads(params, batch_stats, batch):
        def loss_fn(p):
            logits, _ = model.apply(
                {"params": p, "batch_stats": batch_stats},
                batch["image"],
                train=True,
                mutable=["batch_stats"],
            )
            targets = jax.nn.one_hot(batch["label"], logits.shape[-1])
            if label_smoothing:
                targets = optax.smooth_labels(targets, label_smoothing)
            return optax.softmax_cross_entropy(logits, targets).mean()

        return jax.grad(loss_fn)(params)

    return grads


def auto_rgn_estimate(grad_fn, params, batch_stats, batches, labels, static_mult):
    """Auto-RGN multipliers from the gradient averaged over `batches`, times the static ones.
    Eligible: trainable transferred leaves (role 'backbone'); new leaves keep their head LR."""
    total = None
    for batch in batches:
        g = grad_fn(params, batch_stats, batch)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    mean = jax.tree.map(lambda x: x / len(batches), total)
    eligible = jax.tree.map(lambda lbl: optim.role(lbl) == "backbone", labels)
    rgn = optim.auto_rgn_multipliers(mean, params, eligible)
    return jax.tree.map(lambda r, s: (r * jnp.float32(s)).astype(jnp.float32), rgn, static_mult)
