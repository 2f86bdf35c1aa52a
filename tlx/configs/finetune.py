"""Fine-tune a pre-trained backbone on a target dataset with a fine-tuning strategy.

  python -m tlx.main --config=configs/finetune.py:target=digits,strategy=linear_probe,\
init_from=runs/pretrain --workdir=runs/ft_digits_lp

strategy: any registered name (`tlx.strategies.names()`), its knobs by their own names or as
--config.strategy.NAME.KNOB (defaults from the papers; each module under tlx/strategies/ says
what it does):
  none | linear_probe | freeze_most | freeze_early: the seed's presets; freeze_stages (stages=K);
  gradual_unfreeze (every_epochs, every_steps); layer_decay (decay); lp_ft (lp_fraction);
  l2_sp (alpha, beta, form; weight decay 0); surgical (stage); auto_rgn (batches);
  scratch: the same run from a random init at lr = head_lr = 1e-3 (init_from is ignored; an empty
    init_from with another strategy trains from scratch too, at lr/head_lr);
  parameter-efficient, for ViTs: lora (rank, alpha, targets, mlp), bitfit, adapter (dim, norms),
    vpt (prompts, deep).
bn: frozen | train_affine | train_stats | train (BatchNorm in frozen parts).
augment=false turns crops off; with linear_probe that trains the head on cached features.
examples_per_class=N subsamples the target's train split (0: all); the draw follows `seed`
(subset_seed=-1) unless subset_seed=K pins it. val_per_class=N keeps N per class of the val
carve (0: all of it), drawn with the subset's seed: a small target's honest validation split.
"""

from tlx import config as tlx_config
from tlx.convert import pretrained
from tlx.data import pipeline as data_pipeline

ARGS = {
    "backbone": "resnet_tiny",
    "target": "digits",
    "strategy": "none",
    "init_from": "",
    "examples_per_class": 0,
    "subset_seed": -1,  # -1: the run's seed
    "val_per_class": 0,
    "classes": 0,
    "steps": 150,
    "seed": 0,
    "image_size": 32,
    "batch_size": 64,
    "lr": 3e-4,
    "head_lr": 1e-2,
    "augment": True,
    "bn": "frozen",
}


def get_config(arg=None):
    a, knobs, given = tlx_config.parse_strategy_arg(arg, ARGS)
    c = tlx_config.base()
    c.seed = a["seed"]
    c.model.name = a["backbone"]
    if a["backbone"].startswith("resnet"):
        c.model.stem = "cifar" if a["image_size"] < 100 else "imagenet"
    if a["init_from"] == "imagenet":  # inputs as the ImageNet weights were trained on
        normalization = pretrained.normalization(a["backbone"], a["init_from"])
        data_pipeline.backbone_input(c.data, normalization)
    c.init_from = a["init_from"]
    tlx_config.set_dataset(c.data, a["target"], "target", a["classes"])
    c.data.image_size = a["image_size"]
    c.data.examples_per_class = a["examples_per_class"]
    if a["examples_per_class"] or a["val_per_class"]:  # else no draw: the field stays at 0
        c.data.subset_seed = a["seed"] if a["subset_seed"] < 0 else a["subset_seed"]
    c.data.val_examples_per_class = a["val_per_class"]
    if not a["augment"]:
        c.data.augment.crop_padding, c.data.augment.flip = 0, False
    c.freeze.bn = a["bn"]
    c.total_steps = a["steps"]
    c.batch_size = a["batch_size"]
    c.optim.name = "adamw"
    c.optim.lr = a["lr"]  # small: the pre-trained layers
    c.optim.head_lr = a["head_lr"]  # large: the new head (a linear probe needs it)
    explicit = {f"optim.{k}" for k in ("lr", "head_lr") if k in given}
    tlx_config.set_strategy(c, a["strategy"], knobs, keep=explicit)
    c.optim.warmup_steps = max(1, a["steps"] // 10)
    c.log_every = 10
    return c
