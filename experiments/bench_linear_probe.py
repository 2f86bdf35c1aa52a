"""Time per epoch of a linear probe on cached backbone features against the image path.

  python experiments/bench_linear_probe.py [--epochs 3] [--init_from runs/demo/pretrain]

One run of each path of the same config (resnet_tiny, mnist5k, strategy=linear_probe, no
augmentation): the same batches, the same head. The last line is
`speedup=X acc_diff_pp=Y`: X the image path's time per epoch over the cached path's (medians of
the logged throughput, compilation excluded), Y the cached minus the image path's test accuracy
in percentage points. Feature extraction, done once per checkpoint x dataset x preprocessing, is
printed beside it.
"""

import argparse
import os
import tempfile

from absl import logging

from tlx import config as tlx_config
from tlx import data, train


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch_size", type=int, default=64)
    default_init = "runs/demo/pretrain" if os.path.exists("runs/demo/pretrain/summary.json") else ""
    ap.add_argument("--init_from", default=default_init, help="'' = a random backbone")
    args = ap.parse_args()
    logging.set_verbosity(logging.WARNING)
    spec = (
        "configs/finetune.py:backbone=resnet_tiny,target=mnist5k,strategy=linear_probe,"
        f"augment=false,batch_size={args.batch_size},init_from={args.init_from}"
    )
    train_examples = data.load(tlx_config.load(spec).data).num_examples["train"]
    steps = args.epochs * (train_examples // args.batch_size)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cached in (("images", False), ("features", True)):
            config = tlx_config.load(
                spec,
                total_steps=steps,
                progress=False,
                tensorboard=False,
                eval_train=False,
                log_every=10,
                feature_cache=cached,
            )
            s = train.run(config, os.path.join(tmp, name))
            epoch_s = s["dataset"]["num_examples"]["train"] / s["images_per_s"]
            out[name] = (s, epoch_s)
            cache = s["feature_cache"]
            print(
                f"{name:<9} epoch_s={epoch_s:.4f} images_per_s={s['images_per_s']:.0f} "
                f"test_accuracy={s['test_accuracy']:.4f} wall_s={s['wall_s']:.1f}"
                + (f" cache_hit={cache['hit']} extract_s={cache['extract_s']:.2f}" if cache else "")
            )
    speedup = out["images"][1] / out["features"][1]
    diff = 100 * (out["features"][0]["test_accuracy"] - out["images"][0]["test_accuracy"])
    print(f"init_from={args.init_from or '(random)'} epochs={args.epochs} steps={steps}")
    print(f"speedup={speedup:.1f} acc_diff_pp={diff:.2f}")


if __name__ == "__main__":
    main()
