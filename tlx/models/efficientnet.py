"""EfficientNet-Lite (Tan & Le 2019; TF's mobile variant) in lukemelas' EfficientNet-PyTorch layout.

Lite drops squeeze-excitation, uses ReLU6, keeps the stem (32) and last convolution (1280) at fixed
width, and pads as TensorFlow's SAME (the extra pixel after). BatchNorm: eps 1e-3, momentum 0.99.
Same stages as MobileNetV2 (`tlx.models.mobilenet_v2.InvertedResidualNet`): stem at 1/2,
stage1..stage4 at 1/4..1/32, the 1x1 `last_conv` inside stage4, `head` the classifier.
"""

import math

from tlx.models.mobilenet_v2 import InvertedResidualNet, check_stem, make_divisible

# lukemelas' block strings 'r1_k3_s11_e1_i32_o16' as (kernel, stride, expand, out, repeats),
# grouped into tlx stages by resolution: stem, stage1..stage4.
EFFICIENTNET_STAGES = (
    ((3, 1, 1, 16, 1),),
    ((3, 2, 6, 24, 2),),
    ((5, 2, 6, 40, 2),),
    ((3, 2, 6, 80, 3), (5, 1, 6, 112, 3)),
    ((5, 2, 6, 192, 4), (3, 1, 6, 320, 1)),
)

# name: (width coefficient, depth coefficient, resolution, dropout) as in TF's efficientnet_lite.
LITE_PARAMS = {
    "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
    "efficientnet_lite3": (1.2, 1.4, 280, 0.3),
    "efficientnet_lite4": (1.4, 1.8, 300, 0.3),
}


def efficientnet_lite(
    num_classes: int, width: float = 1.0, depth: float = 1.0, **kwargs
) -> InvertedResidualNet:
    """EfficientNet-Lite at width/depth coefficients (Lite0: 1.0, 1.0). As TF's lite builder, the
    first and last block rows keep their repeats. kwargs set other `InvertedResidualNet` fields."""
    check_stem("efficientnet_lite", kwargs)
    rows = [row for stage in EFFICIENTNET_STAGES for row in stage]
    stages, r = [], 0
    for stage in EFFICIENTNET_STAGES:
        out = []
        for k, s, e, c, n in stage:
            fixed = r in (0, len(rows) - 1)
            out.append((e, make_divisible(c * width), n if fixed else math.ceil(depth * n), s, k))
            r += 1
        stages.append(tuple(out))
    return InvertedResidualNet(
        num_classes,
        tuple(stages),
        stem_features=32,
        last_features=1280,
        padding="same",
        bn_eps=1e-3,
        bn_momentum=0.99,
        **kwargs,
    )


def efficientnet_lite0(num_classes: int, **kwargs) -> InvertedResidualNet:
    return efficientnet_lite(num_classes, *LITE_PARAMS["efficientnet_lite0"][:2], **kwargs)
