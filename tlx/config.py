"""The fields every run has, the short-arg parser that config files use, and the migration of
configs written by older versions of tlx.

`configs/*.py` start from `base()` and override what their experiment needs; arguments come as
`configs/finetune.py:backbone=resnet_tiny,target=digits`.
"""

import copy

import ml_collections

from tlx import data, fewshot, freeze, optim, strategies
from tlx.data import roles

# The layout of a resolved config. 1: the strategy and its knobs under `freeze` (before the
# strategy interface); 2: `strategy.name` and `strategy.<name>` (its knobs), `freeze` holds only
# patterns and the bn mode, `feature_cache` at the top. `migrate` turns 1 into 2.
CONFIG_VERSION = 2


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 100
    c.batch_size = 64
    c.eval_batch_size = 0  # 0: batch_size
    c.parallel = "jit"  # jit | pmap
    # A tlx workdir or checkpoint path, or a named pretrained source ('imagenet'); '' = scratch.
    c.init_from = ""
    c.pretrained_path = ""  # an explicit weight file for a named source
    c.init_reinit = ["^head/"]  # leaves (regexes) re-initialised instead of loaded
    c.init_reinit_init = "zeros"  # zeros | init (the model's initialiser)
    c.model = ml_collections.ConfigDict({"name": "resnet_tiny", "stem": ""})
    c.data = data.default_config()
    # The fine-tuning strategy (tlx.strategies) and its knobs, config.strategy.<name>.<knob>: see
    # `set_strategy`. Pre-training is strategy 'none' from a random init.
    c.strategy = ml_collections.ConfigDict({"name": "none"})
    c.freeze = freeze.default_config()
    c.optim = optim.default_config()
    # A frozen backbone with no augmentation trains its head on backbone features computed once
    # and cached on disk (tlx.features); False: on images every step.
    c.feature_cache = True
    # Few-shot ridge probes of the backbone on other targets every `fewshot.every` steps (off: 0).
    c.fewshot = fewshot.default_config()
    c.config_version = CONFIG_VERSION
    c.log_every = 10
    c.eval_every = 0  # 0: evaluate at the end only
    c.checkpoint_every = 0  # 0: save at the end only
    c.max_to_keep = 2
    c.eval_train = True  # report training-split accuracy beside val and test
    c.progress = True
    c.tensorboard = True
    return c


def parse_arg(arg: str | None, defaults: dict) -> dict:
    """'a=1,b=x' -> {'a': 1, 'b': 'x'} over `defaults`, typed like them; unknown keys fail."""
    out = dict(defaults)
    for key, value in _items(arg, defaults).items():
        if key not in defaults:
            raise ValueError(f"unknown config arg {key!r}; known args: {sorted(defaults)}")
        out[key] = _typed(value, defaults[key], key)
    return out


def _items(arg: str | None, known) -> dict:
    out = {}
    for item in (arg or "").split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"config arg {item!r} is not KEY=VALUE (args: {sorted(known)})")
        out[key] = value
    return out


def _typed(value: str, default, key: str):
    kind = type(default)
    if kind is bool:
        if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
            raise ValueError(f"config arg {key}={value!r}: use true or false")
        return value.lower() in ("1", "true", "yes")
    if kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            raise ValueError(
                f"config arg {key}={value!r}: not a{'n int' if kind is int else ' float'}"
            ) from None
    return value


def parse_strategy_arg(arg: str | None, defaults: dict) -> tuple[dict, dict, set]:
    """Short args of a config file with a `strategy` arg: (args over `defaults`, the selected
    strategy's knob values given by name, the names given explicitly). A knob is given by its
    own name (`strategy=lp_ft,lp_fraction=0.3`); a knob named like one of the file's args is
    set with --config.strategy.NAME.KNOB."""
    items = _items(arg, defaults)
    name = items.get("strategy", defaults["strategy"])
    knob_defaults = strategies.get(name).knobs
    unknown = set(items) - set(defaults) - set(knob_defaults)
    if unknown:
        knobs = f"; strategy {name!r} knobs: {sorted(knob_defaults)}" if knob_defaults else ""
        raise ValueError(
            f"unknown config arg {sorted(unknown)[0]!r}; known args: {sorted(defaults)}{knobs}"
        )
    args = parse_arg(",".join(f"{k}={v}" for k, v in items.items() if k in defaults), defaults)
    knobs = {
        k: _typed(v, knob_defaults[k], k)
        for k, v in items.items()
        if k in knob_defaults and k not in defaults
    }
    return args, knobs, set(items)


def set_strategy(c, name: str, knobs: dict | None = None, keep=()) -> None:
    """Select strategy `name` in config `c`: `c.strategy` = {name, NAME: its knobs}, and the config
    defaults the strategy implies (scratch: its LRs), except for the dotted keys in `keep` (those
    the user set explicitly). Bad knob values are errors here, before any training."""
    s = strategies.get(name)
    block = ml_collections.ConfigDict({"name": name})
    if s.knobs:
        block[name] = s.knob_config(knobs)
    elif knobs:
        s.knob_config(knobs)  # raises: the strategy has no knobs
    if s.check is not None:
        s.check(block[name] if s.knobs else ml_collections.ConfigDict())
    c.strategy = block
    for key, value in s.config_defaults.items():
        if key not in keep:
            *parents, leaf = key.split(".")
            node = c
            for p in parents:
                node = node[p]
            node[leaf] = value


# Dataset settings the configs share (which augmentation fits a dataset, the split of fractal
# classes into source and similar target): tlx.data.roles, used by config files as set_dataset.
set_dataset = roles.set_dataset


def load_module(path: str, kind: str = "config"):
    """The Python module of a config or study file, loaded from its path (as config_flags does)."""
    import importlib.util
    import os

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{kind} file {path!r} not found")
    module_spec = importlib.util.spec_from_file_location(
        f"tlx_{kind}_" + os.path.basename(path)[:-3], path
    )
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


# -- configs written by older versions ----------------------------------------------------------
_V1_BLOCKS = ("surgical", "gradual_unfreeze", "lp_ft", "layer_decay", "l2_sp", "auto_rgn")


def migrate(tree: dict) -> dict:
    """A resolved config as a dict (a run's config.json) in today's layout (CONFIG_VERSION):

    1 -> 2: `freeze.strategy` -> `strategy.name`; the selected strategy's knob block
    (`freeze.l2_sp`, ...; `freeze.stages` for freeze_stages) -> `strategy.<name>`, the others
    dropped (they did nothing); `freeze.freeze_bn_stats=False` -> the bn mode that trains
    statistics (what it meant); `freeze.feature_cache` -> `feature_cache`. Then every field added
    since, at its default (each default does what the older version did)."""
    tree = copy.deepcopy(tree)
    if tree.get("config_version", 1) >= CONFIG_VERSION:
        return tree
    f = tree.setdefault("freeze", {})
    name = f.pop("strategy", "none")
    stages = f.pop("stages", 0)
    if not f.pop("freeze_bn_stats", True):
        f["bn"] = {"frozen": "train_stats", "train_affine": "train"}.get(f.get("bn"), f.get("bn"))
    tree["feature_cache"] = f.pop("feature_cache", True)
    blocks = {k: f.pop(k) for k in _V1_BLOCKS if k in f}
    strategy = {"name": name}
    if name == "freeze_stages":
        strategy[name] = {"stages": stages}
    elif name in blocks:
        strategy[name] = blocks[name]
    tree["strategy"] = strategy
    _fill(tree, base().to_dict())
    tree["config_version"] = CONFIG_VERSION
    return tree


def _fill(tree: dict, defaults: dict) -> None:
    for k, v in defaults.items():
        if k not in tree:
            tree[k] = copy.deepcopy(v)
        elif isinstance(v, dict) and isinstance(tree[k], dict):
            _fill(tree[k], v)


def load(spec: str, **overrides) -> ml_collections.ConfigDict:
    """The config of `spec` ('configs/finetune.py:target=digits'), as the CLI would build it,
    with `overrides` given as dotted keys ({'optim.lr': 1e-3}); unknown keys are errors."""
    path, _, arg = spec.partition(":")
    c = load_module(path).get_config(arg or None)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise KeyError(f"unknown config key {key!r}")
        node[leaf] = value
    c.lock()
    return c
