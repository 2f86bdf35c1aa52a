"""Fine-tune a pre-trained backbone on a target dataset with a fine-tuning strategy.

  python -m tlx.main --config=configs/finetune.py:target=digits,strategy=linear_probe,\
init_from=runs/pretrain --workdir=runs/ft_digits_lp

The config is tlx/configs/finetune.py (its args are listed there), packaged with tlx because
`tlx.advise` builds on it; this file is where the commands of the README name it.
"""

from tlx.configs.finetune import ARGS, get_config

__all__ = ["ARGS", "get_config"]
