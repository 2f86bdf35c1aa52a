"""A run's strategy as data: its phases (which leaves train in which step range, in which
optimizer groups, at which LR), its LR multipliers, loss terms and hook; and the one place that
builds a run's optimizer, state and train step from a config and a model.

    plan = strategies.plan(config, variables, steps_per_epoch)
    state = plan.init_state(variables)
    step = tlx.compiler.jit(plan.train_step(model))  # jax.jit with tlx's compiler options

Each phase is one optimizer and one compilation. A strategy that adds parameters (LoRA, adapters,
prompts) has them added by `init_state`, and `model` returns the model as the strategy runs it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from tlx import freeze, optim, transforms
from tlx import step as step_lib
from tlx.strategies import base


@dataclasses.dataclass
class PhaseSetup:
    phase: freeze.Phase
    mask: dict  # True = frozen
    labels: dict  # optimizer group per leaf
    tx: optax.GradientTransformation
    global_lr: dict  # label -> LR of the update that follows `t` done updates (t = global step)
    frozen_bn: tuple[str, ...]


@dataclasses.dataclass
class StepInfo:
    """What a strategy's hook sees before an update (on the host, between compiled steps)."""

    done: int  # updates done so far
    phase: int  # index of the phase of the coming update
    setup: PhaseSetup
    model: Any  # the phase's model (BatchNorm of frozen stages on running statistics)
    lr_mult: Any  # the static LR multipliers (whole tree of floats) or None
    dataset: Any
    runner: Any  # tlx.parallel.Runner
    batch_size: int
    steps_per_epoch: int
    seed: int
    label_smoothing: float


@dataclasses.dataclass
class Plan:
    strategy: base.Strategy
    ctx: base.Context
    bn_mode: str
    phases: list[PhaseSetup]
    lr_mult: Any  # static per-leaf multipliers (Python floats), None when there are none
    loss_terms: tuple
    hook: Any  # fn(StepInfo, state) -> state, or None
    extend: Any = None  # fn(params) -> params with the strategy's new leaves, or None

    @property
    def params(self):
        """The (abstract) tree the run trains: the model's params plus the strategy's leaves."""
        return self.ctx.params

    @property
    def name(self) -> str:
        return self.strategy.name

    def index(self, done_steps: int) -> int:
        return freeze.phase_at([s.phase for s in self.phases], done_steps)

    def init_state(self, variables, phase: int = 0) -> dict:
        """A fresh run state {params, batch_stats, opt_state, step} for `variables` in `phase`."""
        params = variables["params"]
        if self.extend is not None and not _same_structure(params, self.ctx.params):
            params = self.extend(params)
        return {
            "params": params,
            "batch_stats": variables.get("batch_stats", {}),
            "opt_state": self.phases[phase].tx.init(params),
            "step": jnp.asarray(0, jnp.int32),
        }

    def enter(self, state: dict, phase: int) -> dict:
        """`state` (on the host) moved into `phase`: a new optimizer state, with the groups the
        phase carries on (not `fresh`) taking theirs over."""
        opt_state = self.phases[phase].tx.init(state["params"])
        if not self.phases[phase].phase.fresh:
            opt_state = optim.carry_state(opt_state, state["opt_state"])
        return {**state, "opt_state": opt_state}

    def model(self, model, phase: int = 0):
        """`model` as the step of `phase` runs it: the phase's BatchNorm policy, the strategy's
        module fields, and its `apply_params` between the run's params and the module."""
        fields = self.strategy.model_fields(self.ctx) if self.strategy.model_fields else {}
        try:
            m = model.clone(frozen_bn=self.phases[phase].frozen_bn, **fields)
        except TypeError:
            raise ValueError(
                f"strategy {self.name!r} runs the model with fields {fields}, which "
                f"{type(model).__name__} does not have (tlx.models.vit.ViT has them)"
            ) from None
        if self.strategy.apply_params is None:
            return m
        return StrategyModel(m, functools.partial(self.strategy.apply_params, self.ctx))

    def model_params(self, params):
        """The tree the model is applied to for the run's `params` (LoRA: merged kernels)."""
        if self.strategy.apply_params is None:
            return params
        return self.strategy.apply_params(self.ctx, params)

    def train_step(self, model, phase: int = 0, axis_name=None):
        """The (uncompiled) train step of `phase` for `model` (the phase's BatchNorm policy is
        applied here)."""
        s = self.phases[phase]
        return step_lib.make_train_step(
            self.model(model, phase),
            s.tx,
            s.labels,
            loss_terms=self.loss_terms,
            label_smoothing=self.ctx.config.optim.label_smoothing,
            axis_name=axis_name,
        )


class StrategyModel:
    """A Flax model whose params pass through `fn` (a strategy's `apply_params`) before it runs:
    `.apply(variables, x, ...)` and `.clone(**fields)` as the module's, anything else delegated."""

    def __init__(self, module, fn):
        self.module, self.fn = module, fn

    def apply(self, variables, *args, **kwargs):
        return self.module.apply(
            {**variables, "params": self.fn(variables["params"])}, *args, **kwargs
        )

    def clone(self, **fields):
        return StrategyModel(self.module.clone(**fields), self.fn)

    def __getattr__(self, name):
        if name in ("module", "fn"):  # not set yet (copy, pickle)
            raise AttributeError(name)
        return getattr(self.module, name)


# The stream of jax.random.key(config.seed) that a strategy's new parameters are drawn from.
_PARAMS_STREAM = 0x7E4F7


def _same_structure(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b)


def _extender(strategy: base.Strategy, ctx: base.Context):
    """(fn(params) -> extended params, the extended abstract tree), checking that the strategy
    returns every leaf it was given, unchanged in shape, and adds leaves under existing stages."""
    rng = jax.random.fold_in(jax.random.key(int(ctx.config.seed)), _PARAMS_STREAM)

    def extend(params):
        return strategy.init_params(ctx, params, rng)

    extended = jax.eval_shape(extend, ctx.params)
    before = dict(zip(freeze.leaf_paths(ctx.params), jax.tree.leaves(ctx.params), strict=True))
    after = dict(zip(freeze.leaf_paths(extended), jax.tree.leaves(extended), strict=True))
    lost = [p for p in before if p not in after or after[p].shape != before[p].shape]
    if lost:
        raise ValueError(f"strategy {strategy.name!r}: init_params dropped or reshaped {lost}")
    if set(extended) != set(ctx.params):
        raise ValueError(
            f"strategy {strategy.name!r}: init_params added top-level modules "
            f"{sorted(set(extended) - set(ctx.params))}; put new leaves under stem/stageK/head"
        )
    return extend, extended


def _phases(strategy: base.Strategy, ctx: base.Context) -> list[freeze.Phase]:
    extra = tuple(ctx.config.freeze.patterns)
    if strategy.phases is not None:
        out = strategy.phases(ctx)
    else:
        frozen = tuple(strategy.frozen(ctx)) if strategy.frozen else ()
        out = [freeze.Phase(0, ctx.total_steps, frozen, fresh=True)]
    if not out or out[0].start != 0 or not out[0].fresh:
        raise ValueError(f"strategy {strategy.name!r}: its first phase must start fresh at step 0")
    return [dataclasses.replace(p, patterns=tuple(p.patterns) + extra) for p in out]


def plan(config, variables, steps_per_epoch: int = 1, from_checkpoint: bool = True) -> Plan:
    """The plan of `config` on a model with (abstract) `variables`. `from_checkpoint`: the run
    loads pre-trained weights, so the leaves of `config.init_reinit` are a new head (own LR)."""
    strategy = base.get(config.strategy.name)
    knobs = base.knobs_of(config)
    if strategy.check is not None:
        strategy.check(knobs)
    freeze.check(config.freeze)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    ctx = base.Context(config, knobs, params, batch_stats, int(steps_per_epoch))
    extend = None
    if strategy.init_params is not None:  # masks, groups and counts over the extended tree
        extend, params = _extender(strategy, ctx)
        ctx = dataclasses.replace(ctx, params=params)
    ocfg, bn = config.optim, config.freeze.bn
    total = ctx.total_steps

    mults = [strategy.lr_mult(ctx)] if strategy.lr_mult else []
    if ocfg.lr_mults:
        mults.append(optim.regex_multipliers(params, ocfg.lr_mults))
    lr_mult = optim.combine(*mults) if mults else None
    if lr_mult is not None and optim.is_trivial(lr_mult) and strategy.hook is None:
        lr_mult = None  # all 1 and nothing will change them: no transform at all

    phases = _phases(strategy, ctx)
    reinit = list(config.init_reinit) if from_checkpoint and not strategy.from_scratch else []
    lrs = optim.group_lrs(ocfg)
    setups, since, segment = [], None, None
    for k, phase in enumerate(phases):
        mask = freeze.frozen_mask(params, list(phase.patterns), bn, batch_stats)
        if phase.fresh:  # a new optimizer, its schedules over [start, next fresh phase)
            end = next((p.start for p in phases[k + 1 :] if p.fresh), total)
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

        def branch(label, tx, schedules=schedules):
            if lr_mult is not None:
                tx = optax.chain(tx, transforms.scale_by_multipliers(lr_mult))
            if strategy.wrap is None:
                return tx
            return strategy.wrap(ctx, base.Branch(label, tx, schedules[label], lr_mult))

        setups.append(
            PhaseSetup(
                phase=phase,
                mask=mask,
                labels=labels,
                tx=optim.build(ocfg, labels, schedules, branch),
                global_lr=global_lr,
                frozen_bn=freeze.frozen_stages(params, list(phase.patterns), bn),
            )
        )
    return Plan(
        strategy=strategy,
        ctx=ctx,
        bn_mode=bn,
        phases=setups,
        lr_mult=lr_mult,
        loss_terms=(strategy.loss(ctx),) if strategy.loss else (),
        hook=strategy.hook(ctx) if strategy.hook else None,
        extend=extend,
    )


def _shifted(sched, offset: int):
    return sched if offset == 0 else (lambda count: sched(count + offset))
