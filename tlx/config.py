"""The fields every run has, and the short-arg parser that config files use.

`configs/*.py` start from `base()` and override what their experiment needs; arguments come as
`configs/finetune.py:backbone=resnet_tiny,target=digits`.
"""

import ml_collections

from tlx import data, freeze, optim


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
    c.freeze = freeze.default_config()
    c.optim = optim.default_config()
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
    if not arg:
        return out
    for item in arg.split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"config arg {item!r} is not KEY=VALUE (args: {sorted(defaults)})")
        if key not in defaults:
            raise ValueError(f"unknown config arg {key!r}; known args: {sorted(defaults)}")
        kind = type(defaults[key])
        if kind is bool:
            out[key] = value.lower() in ("1", "true", "yes")
        elif kind in (int, float):
            out[key] = kind(value)
        else:
            out[key] = value
    return out


# Dataset settings the configs share: what augmentation makes sense, and the split of fractal
# classes into a pre-training source (classes 0..29) and a "similar" target (new classes 30..).
DIGIT_DATASETS = ("digits", "mnist5k")
SOURCE_FRACTAL_CLASSES = 30


def set_dataset(d: ml_collections.ConfigDict, name: str, role: str, classes: int = 0) -> None:
    """Point the data config `d` at dataset `name` used as a `role` ('source' or 'target')."""
    d.name = name
    if name in DIGIT_DATASETS or name == "lfw_subset":
        d.augment.flip = False  # a mirrored digit is another symbol; faces are not mirrored here
    if name == "fractals":
        d.augment.flip = False  # an IFS class is not mirror-symmetric
        if role == "source":
            d.fractals.num_classes = classes or SOURCE_FRACTAL_CLASSES
            d.fractals.class_offset = 0
        else:  # new classes from the same generator: similar to the source, disjoint from it
            d.fractals.num_classes = classes or 10
            d.fractals.class_offset = SOURCE_FRACTAL_CLASSES
            d.fractals.train_per_class = 240


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
