"""A dataset in the role a run gives it: a pre-training source or a fine-tuning target.

What augmentation makes sense for a dataset, and the split of the fractal classes into a source
(classes 0..29) and a "similar" target (new classes 30..) from the same generator.
"""

import ml_collections

DIGIT_DATASETS = ("digits", "mnist5k")
SOURCE_FRACTAL_CLASSES = 30


def set_dataset(d: ml_collections.ConfigDict, name: str, role: str, classes: int = 0) -> None:
    """Point the data config `d` at dataset `name` used as a `role` ('source' or 'target').
    `classes` (a number of fractal classes) applies to fractals only: elsewhere it is an error,
    not silently ignored."""
    if classes and name != "fractals":
        raise ValueError(
            f"config arg classes={classes} applies to fractals only, not to {name!r}: "
            "drop it (a subset of classes of another dataset is not supported)"
        )
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
