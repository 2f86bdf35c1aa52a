"""What a fine-tuning strategy is: a `Strategy` (its knobs and what it contributes to a run) and
the registry of strategies by name.

A strategy contributes any of: the parameters it freezes (or its phases, each a step range with
its frozen patterns), per-leaf LR multipliers, optax transforms around the base optimizer of each
trainable branch, a loss term, a hook between steps, config defaults, and for parameter-efficient
methods new leaves (LoRA factors, adapters, prompts) with how the model sees them. Everything else
(masks, optimizer groups, schedules, the train step) is generic: `tlx.strategies.plan`
(planning.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_collections
import optax

from tlx import freeze


@dataclasses.dataclass(frozen=True)
class Context:
    """What a strategy's functions see: the run's config, the strategy's knobs, the (abstract)
    variables of the model, and the run's length."""

    config: Any  # the run's resolved config
    knobs: Any  # config.strategy.<name>: the strategy's knob block (empty when it has none)
    params: Any
    batch_stats: Any
    steps_per_epoch: int

    @property
    def total_steps(self) -> int:
        return int(self.config.total_steps)

    @property
    def stages(self) -> list[str]:
        """The backbone's stages in network order, without the head: stem, stage1..stageN."""
        return freeze.stage_names(self.params)[:-1]


@dataclasses.dataclass(frozen=True)
class Branch:
    """One trainable optimizer group of a phase, as `Strategy.wrap` sees it."""

    label: str  # 'backbone', 'head', or 'backbone:p2' (first trainable in phase 2)
    tx: optax.GradientTransformation  # clip (if any) + base optimizer + LR multipliers (if any)
    schedule: optax.Schedule  # its LR as a function of its own update count
    lr_mult: (
        Any  # the static per-leaf multipliers (a whole-tree of floats), None when there are none
    )

    @property
    def role(self) -> str:
        """'backbone' (transferred leaves) or 'head' (re-initialised ones)."""
        return self.label.split(":")[0]


@dataclasses.dataclass(frozen=True)
class Strategy:
    """One fine-tuning strategy. Every field but `name` is optional.

    knobs            {knob: default}: its config block, `config.strategy.<name>`
    check            fn(knobs): raise ValueError naming a knob value that cannot work
    frozen           fn(ctx) -> [regex, ...]: the parameters frozen for the whole run
    phases           fn(ctx) -> [freeze.Phase, ...]: a schedule of frozen sets (instead of frozen)
    lr_mult          fn(ctx) -> tree of floats: static per-leaf LR multipliers (a transform of
                     `tlx.transforms` after the base optimizer; its state holds them)
    wrap             fn(ctx, branch) -> tx: what a trainable branch (a `Branch`) runs instead of
                     `branch.tx` (its clip + base optimizer + multipliers), e.g.
                     optax.chain(branch.tx, tlx.transforms.proximal_to_init(...))
    loss             fn(ctx) -> fn(params) -> scalar: a term added to the cross-entropy
    hook             fn(ctx) -> fn(info, state) -> state: called before every update on the host
                     (`info`: a `tlx.strategies.StepInfo`)
    config_defaults  {dotted config key: value} the strategy implies (scratch: its LRs); set when
                     the strategy is selected, explicit config args win
    from_scratch     True: the run starts from a random init, whatever init_from says
    init_params      fn(ctx, params, rng) -> params: the model's params with the strategy's new
                     leaves added (under the existing top-level stages); every given leaf comes
                     back as it is. The plan's masks, groups and counts are over this tree, and
                     `Plan.init_state` adds the leaves (a fixed rng from config.seed). `ctx.params`
                     is the model's plain (abstract) tree here, the extended one everywhere else.
    apply_params     fn(ctx, params) -> params: the tree the model is applied to (LoRA: kernels
                     merged, its factors dropped); `Plan.model` wraps the model to apply it
    model_fields     fn(ctx) -> {field: value}: module fields the model runs with (hooks that
                     default off: the ViT's adapter_dim, num_prompts); `Plan.model` clones with them
    tags             what kind of strategy it is, for reports and benchmarks (`tagged`): 'preset'
                     (freezes a fixed number of stages), 'peft' (parameter-efficient: trains added
                     or few parameters), 'baseline' (reported beside, never a condition's winner)
    """

    name: str
    doc: str = ""
    knobs: dict = dataclasses.field(default_factory=dict)
    check: Callable[[Any], None] | None = None
    frozen: Callable[[Context], list[str]] | None = None
    phases: Callable[[Context], list[freeze.Phase]] | None = None
    lr_mult: Callable[[Context], Any] | None = None
    wrap: Callable[[Context, Branch], optax.GradientTransformation] | None = None
    loss: Callable[[Context], Callable] | None = None
    hook: Callable[[Context], Callable] | None = None
    config_defaults: dict = dataclasses.field(default_factory=dict)
    from_scratch: bool = False
    init_params: Callable[[Context, Any, Any], Any] | None = None
    apply_params: Callable[[Context, Any], Any] | None = None
    model_fields: Callable[[Context], dict] | None = None
    tags: tuple[str, ...] = ()

    def knob_config(self, values: dict | None = None) -> ml_collections.ConfigDict:
        """The strategy's config block: its knobs at their defaults, updated by `values`."""
        values = dict(values or {})
        unknown = set(values) - set(self.knobs)
        if unknown:
            raise ValueError(
                f"strategy {self.name!r} has no knob(s) {sorted(unknown)}; "
                f"its knobs: {sorted(self.knobs) or 'none'}"
            )
        block = ml_collections.ConfigDict(dict(self.knobs))
        for k, v in values.items():
            block[k] = v
        return block


REGISTRY: dict[str, Strategy] = {}


def register(strategy: Strategy, *, replace: bool = False) -> Strategy:
    """Make `strategy` selectable by name (`configs/finetune.py:strategy=NAME`). In a notebook,
    re-running the cell that registers it needs replace=True."""
    if not strategy.name.isidentifier():
        raise ValueError(f"strategy name {strategy.name!r}: use a Python identifier")
    if strategy.frozen is not None and strategy.phases is not None:
        raise ValueError(f"strategy {strategy.name!r}: give frozen or phases, not both")
    if strategy.name in REGISTRY and not replace:
        raise ValueError(
            f"a strategy named {strategy.name!r} is registered already "
            "(register(..., replace=True) to redefine it)"
        )
    REGISTRY[strategy.name] = strategy
    return strategy


def get(name: str) -> Strategy:
    if name not in REGISTRY:
        raise ValueError(
            f"unknown freeze strategy {name!r}; registered: {sorted(REGISTRY)} "
            "(freeze.patterns=[regex, ...] freezes by path with any of them; "
            "tlx.strategies.register adds one)"
        )
    return REGISTRY[name]


def tagged(tag: str) -> list[str]:
    """The registered strategies with `tag` (see `Strategy.tags`), in registration order."""
    return [name for name, s in REGISTRY.items() if tag in s.tags]


def knobs_of(config) -> ml_collections.ConfigDict:
    """config.strategy.<name>, or an empty block for a strategy without knobs."""
    s = config.strategy
    return s[s.name] if s.name in s else ml_collections.ConfigDict()
