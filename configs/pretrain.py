"""Pre-train a backbone on a source dataset.

  python -m tlx.main --config=configs/pretrain.py:backbone=resnet_tiny,source=fractals \
      --workdir=runs/pretrain
"""

from tlx import config as tlx_config

ARGS = {
    "backbone": "resnet_tiny",
    "source": "fractals",
    "classes": 0,
    "steps": 300,
    "image_size": 32,
    "seed": 0,
    "batch_size": 128,
    "lr": 2e-3,
}


def get_config(arg=None):
    a = tlx_config.parse_arg(arg, ARGS)
    c = tlx_config.base()
    c.seed = a["seed"]
    c.model.name = a["backbone"]
    if a["backbone"].startswith("resnet"):  # the stem option is ResNet-only
        c.model.stem = "cifar" if a["image_size"] < 100 else "imagenet"
    tlx_config.set_dataset(c.data, a["source"], "source", a["classes"])
    c.data.image_size = a["image_size"]
    c.total_steps = a["steps"]
    c.batch_size = a["batch_size"]
    c.optim.name = "adamw"
    c.optim.lr = a["lr"]
    c.optim.warmup_steps = max(1, a["steps"] // 20)
    c.optim.weight_decay = 5e-2
    c.log_every = 20
    c.eval_every = 100
    c.checkpoint_every = 100
    return c
