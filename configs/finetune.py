"""Fine-tune a pre-trained backbone on a target dataset with a freeze strategy.

  python -m tlx.main --config=configs/finetune.py:target=digits,strategy=linear_probe,\
init_from=runs/pretrain --workdir=runs/ft_digits_lp

strategy: none | linear_probe | freeze_most | freeze_early (or freeze_stages=K).
examples_per_class=N subsamples the target's train split (0: all).
"""

from tlx import config as tlx_config

ARGS = {
    "backbone": "resnet_tiny",
    "target": "digits",
    "strategy": "none",
    "freeze_stages": -1,
    "init_from": "",
    "examples_per_class": 0,
    "classes": 0,
    "steps": 150,
    "seed": 0,
    "image_size": 32,
    "batch_size": 64,
    "lr": 3e-4,
    "head_lr": 1e-2,
}


def get_config(arg=None):
    a = tlx_config.parse_arg(arg, ARGS)
    c = tlx_config.base()
    c.seed = a["seed"]
    c.model.name = a["backbone"]
    c.model.stem = "cifar" if a["image_size"] < 100 else "imagenet"
    c.init_from = a["init_from"]
    tlx_config.set_dataset(c.data, a["target"], "target", a["classes"])
    c.data.image_size = a["image_size"]
    c.data.examples_per_class = a["examples_per_class"]
    if a["freeze_stages"] >= 0:
        c.freeze.strategy, c.freeze.stages = "freeze_stages", a["freeze_stages"]
    else:
        c.freeze.strategy = a["strategy"]
    c.total_steps = a["steps"]
    c.batch_size = a["batch_size"]
    c.optim.name = "adamw"
    c.optim.lr = a["lr"]  # small: the pre-trained layers
    c.optim.head_lr = a["head_lr"]  # large: the new head (a linear probe needs it)
    c.optim.warmup_steps = max(1, a["steps"] // 10)
    c.log_every = 10
    return c
