"""The fields every run has, the short-arg parser that config files use, and the migration of
configs written by older versions of tlx.

`configs/*.py` start from `base()` and override what their experiment needs; arguments come as
`configs/finetune.py:backbone=resnet_tiny,target=digits`.
"""

import copy
import math
import re

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
    # dtype: the compute dtype. bfloat16 computes convolutions, matmuls and activations in bf16
    # with float32 parameters, optimizer state, BatchNorm statistics, logits and loss.
    c.model = ml_collections.ConfigDict({"name": "resnet_tiny", "stem": "", "dtype": "float32"})
    c.data = data.default_config()
    # The fine-tuning strategy (tlx.strategies) and its knobs, config.strategy.<name>.<knob>: see
    # `set_strategy`. Pre-training is strategy 'none' from a random init.
    c.strategy = ml_collections.ConfigDict({"name": "none"})
    c.freeze = freeze.default_config()
    c.optim = optim.default_config()
    # A frozen backbone with no augmentation trains its head on backbone features computed once
    # and cached on disk (tlx.features); False: on images every step.
    c.feature_cache = True
    # A cache (all splits, float32) larger than this is refused and the run trains on images
    # (0: no limit).
    c.feature_cache_max_mb = 4096.0
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


# -- validation: every field where the config is resolved ----------------------------------------
def _num(lo=None, hi=None, lo_open=False, hi_open=False, kind=(int, float)):
    """A check of a finite number in a range (open or closed at each end)."""

    def check(v):
        if isinstance(v, bool) or not isinstance(v, kind):
            names = "an int" if kind is int else "a number"
            return f"not {names}"
        if not math.isfinite(v):
            return "not finite"
        if lo is not None and (v <= lo if lo_open else v < lo):
            return f"use a value {'>' if lo_open else '>='} {lo}"
        if hi is not None and (v >= hi if hi_open else v > hi):
            return f"use a value {'<' if hi_open else '<='} {hi}"
        return None

    return check


def _one_of(*values):
    return lambda v: None if v in values else f"use one of {list(values)}"


def _bool(v):
    return None if isinstance(v, bool) else "use true or false"


def _regexes(v):
    if isinstance(v, str) or not isinstance(v, list | tuple):
        return "use a list of regexes"
    for p in v:
        try:
            re.compile(p)
        except (re.error, TypeError) as e:
            return f"{p!r} is not a valid regex ({e})"
    return None


def _lr_mults(v):
    if not isinstance(v, list | tuple):
        return "use a list of [regex, multiplier] pairs"
    for pair in v:
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            return f"{pair!r} is not a [regex, multiplier] pair"
        bad = _regexes([pair[0]]) or _num(0.0)(pair[1])
        if bad:
            return f"{pair!r}: {bad}"
    return None


def _range_pair(lo, hi):
    def check(v):
        if not isinstance(v, list | tuple) or len(v) != 2:
            return "use two numbers (low, high)"
        bad = _num(lo, hi, lo_open=True)(v[0]) or _num(lo, hi, lo_open=True)(v[1])
        return bad or (None if v[0] <= v[1] else "low > high")

    return check


def _shots(v):
    if not isinstance(v, list | tuple) or not v:
        return "use a list of shot counts"
    return next((f"{x!r}: {b}" for x in v if (b := _num(1, kind=int)(x))), None)


_COUNT, _COUNT0 = _num(1, kind=int), _num(0, kind=int)
_RATE = _num(0.0)
CHECKS = {
    "seed": _COUNT0,
    "total_steps": _COUNT,
    "batch_size": _COUNT,
    "eval_batch_size": _COUNT0,
    "parallel": _one_of("jit", "pmap"),
    "init_reinit": _regexes,
    "init_reinit_init": _one_of("zeros", "init"),
    "model.stem": _one_of("", "cifar", "imagenet"),
    "model.dtype": _one_of("float32", "bfloat16"),
    "data.image_size": _num(4, kind=int),
    "data.channels": _one_of(1, 3),
    "data.normalize": _one_of("unit", "imagenet", "tf_lite"),
    "data.val_fraction": _num(0.0, 1.0, lo_open=True, hi_open=True),
    "data.examples_per_class": _COUNT0,
    "data.subset_seed": _COUNT0,
    "data.val_examples_per_class": _COUNT0,
    "data.in_memory": _one_of("auto", "true", "false"),
    "data.workers": _COUNT0,
    "data.eval_crop_fraction": _num(0.0, 1.0),
    "data.augment.crop_padding": _COUNT0,
    "data.augment.flip": _bool,
    "data.augment.inception_crop": _bool,
    "data.augment.inception_scale": _range_pair(0.0, 1.0),
    "data.augment.inception_ratio": _range_pair(0.0, None),
    "data.fractals.num_classes": _COUNT,
    "data.fractals.class_offset": _COUNT0,
    "data.fractals.train_per_class": _COUNT,
    "data.fractals.test_per_class": _COUNT,
    "data.fractals.resolution": _COUNT,
    "data.fractaldb.num_classes": _COUNT,
    "data.fractaldb.train_per_class": _COUNT,
    "data.fractaldb.test_per_class": _COUNT,
    "freeze.patterns": _regexes,
    "freeze.bn": _one_of(*freeze.BN_MODES),
    "optim.name": _one_of("adamw", "sgd"),
    "optim.lr": _RATE,
    "optim.head_lr": _RATE,
    "optim.schedule": _one_of("warmup_cosine", "constant"),
    "optim.warmup_steps": _COUNT0,
    "optim.end_lr_factor": _num(0.0),
    "optim.weight_decay": _RATE,
    "optim.decay_kernels_only": _bool,
    "optim.momentum": _num(0.0, 1.0, hi_open=True),
    "optim.b2": _num(0.0, 1.0, hi_open=True),
    "optim.nesterov": _bool,
    "optim.clip_norm": _RATE,
    "optim.label_smoothing": _num(0.0, 1.0, hi_open=True),
    "optim.lr_mults": _lr_mults,
    "feature_cache": _bool,
    "feature_cache_max_mb": _num(0.0),
    "fewshot.every": _COUNT0,
    "fewshot.shots": _shots,
    "fewshot.seeds": _COUNT,
    "fewshot.l2": _num(0.0, lo_open=True),
    "fewshot.batch_size": _COUNT,
    "log_every": _COUNT,
    "eval_every": _COUNT0,
    "checkpoint_every": _COUNT0,
    "max_to_keep": _COUNT,
    "eval_train": _bool,
    "progress": _bool,
    "tensorboard": _bool,
}


def validate(c) -> None:
    """Every field of a resolved config checked (ranges of counts, LRs and fractions, strict
    booleans, known names, valid regexes): a ValueError naming the first bad field, one line."""
    for key, check in CHECKS.items():
        node, found = c, True
        for part in key.split("."):
            if part not in node:
                found = False
                break
            node = node[part]
        if not found:
            continue
        problem = check(node)
        if problem:
            raise ValueError(f"config {key}={node!r}: {problem}")
    if c.model.name not in _model_names():
        raise ValueError(f"config model.name={c.model.name!r}: use one of {_model_names()}")
    if not str(c.data.name).strip():
        raise ValueError("config data.name='': name a dataset")
    if c.data.fractals.class_offset < 0:
        raise ValueError("config data.fractals.class_offset: use a value >= 0")
    name = c.strategy.name
    s = strategies.get(name)  # an unknown strategy: a one-line error naming the registered ones
    if s.check is not None:
        s.check(strategies.knobs_of(c))
    if c.optim.lr == 0 and (c.optim.head_lr or 0) == 0:
        raise ValueError("config optim.lr=0 and optim.head_lr=0: nothing would train")


def _model_names() -> list[str]:
    from tlx import models

    return sorted(models.MODELS)


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
        set_key(c, key, value)
    c.lock()
    validate(c)
    return c


def set_key(c, key: str, value) -> None:
    """c[key] = value for a dotted key; an unknown key is a one-line KeyError naming it and the
    keys beside it. A string `value` is typed like the field (`parse_value`)."""
    node, seen = c, []
    for p in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or p not in node:
            keys = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            where = ".".join(seen) or "the config"
            raise KeyError(
                f"unknown config key {key!r}: {where} has no {p!r} (its keys: {', '.join(keys)})"
            )
        parent, node = node, node[p]
        seen.append(p)
    node, leaf = parent, seen[-1]
    old = node[leaf]
    if isinstance(old, ml_collections.ConfigDict):
        raise KeyError(f"config key {key!r} is a block, not a field (its keys: {sorted(old)})")
    if isinstance(value, str) and not isinstance(old, str):
        value = parse_value(value, old, key)
    try:
        node[leaf] = value
    except TypeError as e:
        raise ValueError(f"config {key}={value!r}: {e}") from None


def parse_value(text: str, old, key: str):
    """A command-line string typed like the field's current value `old`: strict booleans, ints,
    floats, and lists/tuples as JSON ('[1, 2]') or comma-separated items typed like the old
    items (or strings)."""
    import json

    if isinstance(old, list | tuple):
        stripped = text.strip()
        if stripped.startswith("(") and stripped.endswith(")"):  # a tuple as Python writes it
            stripped = "[" + stripped[1:-1].rstrip().rstrip(",") + "]"
        if stripped.startswith("["):
            try:
                items = json.loads(stripped)
            except json.JSONDecodeError as e:
                raise ValueError(f"config {key}={text!r}: not a JSON list ({e})") from None
        else:
            parts = [t for t in stripped.split(",") if t] if stripped else []
            proto = old[0] if old else ""
            items = [t if isinstance(proto, str) else _typed(t, proto, key) for t in parts]
        return tuple(items) if isinstance(old, tuple) else list(items)
    if old is None:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return _typed(text, old, key)
