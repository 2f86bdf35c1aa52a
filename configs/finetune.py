"""Fine-tune a pre-trained backbone on a target dataset with a fine-tuning strategy.

  python -m tlx.main --config=configs/finetune.py:target=digits,strategy=linear_probe,\
init_from=runs/pretrain --workdir=runs/ft_digits_lp

strategy (config.freeze.strategy; knobs in config.freeze.STRATEGY, defaults from the papers):
  none | linear_probe | freeze_most | freeze_early (or freeze_stages=K): the seed's presets;
  gradual_unfreeze: head first, then one stage more (top down) every unfreeze_every_epochs;
  layer_decay: LR of a stage k below the top one = lr * layer_decay**k (ULMFiT: 1/2.6);
  lp_ft: linear probe for lp_fraction of the steps, then everything at lr from that head;
  l2_sp: alpha/2 ||w - w0||^2 + beta/2 ||w_new||^2 instead of weight decay (Li et al. 2018);
  surgical: tune surgical_stage only (with the new head);
  auto_rgn: per-tensor LR multiplier ||g||/||w|| over its max, re-estimated each epoch;
  scratch: the same run from a random init at scratch_lr (init_from is ignored; an empty
    init_from with another strategy is scratch too, at lr/head_lr).
bn: frozen | train_affine | train_stats | train (BatchNorm in frozen parts).
augment=false turns crops off; with linear_probe that trains the head on cached features.
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
    "scratch_lr": 1e-3,
    "augment": True,
    "bn": "frozen",
    "surgical_stage": "stage1",
    "unfreeze_every_epochs": 1.0,
    "lp_fraction": 0.5,
    "layer_decay": 1 / 2.6,
    "l2_sp_alpha": 0.1,
    "l2_sp_beta": 0.01,
    "l2_sp_form": "loss",
    "rgn_batches": 4,
}


def get_config(arg=None):
    a = tlx_config.parse_arg(arg, ARGS)
    c = tlx_config.base()
    c.seed = a["seed"]
    c.model.name = a["backbone"]
    if a["backbone"].startswith("resnet"):
        c.model.stem = "cifar" if a["image_size"] < 100 else "imagenet"
    if a["init_from"] == "imagenet":  # inputs as the ImageNet weights were trained on
        # EfficientNet-Lite was trained on (x - 127) / 128: 'unit' (x/255*2-1) is within 0.4%.
        c.data.normalize = "unit" if a["backbone"].startswith("efficientnet") else "imagenet"
    c.init_from = a["init_from"]
    tlx_config.set_dataset(c.data, a["target"], "target", a["classes"])
    c.data.image_size = a["image_size"]
    c.data.examples_per_class = a["examples_per_class"]
    if not a["augment"]:
        c.data.augment.crop_padding, c.data.augment.flip = 0, False
    if a["freeze_stages"] >= 0:
        c.freeze.strategy, c.freeze.stages = "freeze_stages", a["freeze_stages"]
    else:
        c.freeze.strategy = a["strategy"]
    f = c.freeze
    f.bn = a["bn"]
    f.surgical.stage = a["surgical_stage"]
    f.gradual_unfreeze.every_epochs = a["unfreeze_every_epochs"]
    f.lp_ft.lp_fraction = a["lp_fraction"]
    f.layer_decay.decay = a["layer_decay"]
    f.l2_sp.alpha, f.l2_sp.beta, f.l2_sp.form = a["l2_sp_alpha"], a["l2_sp_beta"], a["l2_sp_form"]
    f.auto_rgn.batches = a["rgn_batches"]
    c.total_steps = a["steps"]
    c.batch_size = a["batch_size"]
    c.optim.name = "adamw"
    c.optim.lr = a["lr"]  # small: the pre-trained layers
    c.optim.head_lr = a["head_lr"]  # large: the new head (a linear probe needs it)
    if a["strategy"] == "scratch":
        c.optim.lr = c.optim.head_lr = a["scratch_lr"]
    if a["strategy"] == "l2_sp":
        c.optim.weight_decay = 0.0  # the L2-SP penalty replaces weight decay (Li et al. 2018)
    c.optim.warmup_steps = max(1, a["steps"] // 10)
    c.log_every = 10
    return c
