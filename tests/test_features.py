"""The feature-cached linear probe: same batches and head as the image path, cached on disk,
recomputed when the checkpoint or the preprocessing changes."""

import os

import jax
import numpy as np

from tlx import config as tlx_config
from tlx import data, features, models, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = "configs/finetune.py:target=digits,strategy=linear_probe,augment=false,image_size=16"


def cfg(spec=SPEC, **overrides):
    base = {"progress": False, "tensorboard": False, "eval_train": False}
    return tlx_config.load(os.path.join(ROOT, spec), **base, **overrides)


def test_feature_batches_come_in_the_order_of_the_image_batches():
    c = cfg()
    dataset = data.load(c.data)
    n = dataset.num_examples["train"]
    batch = next(dataset.eval_batches("train", n))
    fake = features.FeatureDataset(  # "features" that are the images
        "fake",
        10,
        features={"train": batch["image"].reshape(n, -1)},
        labels={"train": batch["label"]},
    )
    feature_it = fake.train_iter(32, seed=3)
    image_it = dataset.train_iter(32, seed=3)
    for _ in range(n // 32 + 3):  # across an epoch boundary
        f, i = next(feature_it), next(image_it)
        np.testing.assert_array_equal(f["image"], i["image"].reshape(32, -1))
        np.testing.assert_array_equal(f["label"], i["label"])


def test_cache_key_changes_with_the_backbone_the_preprocessing_and_the_data_only():
    c = cfg()
    model = models.build("resnet_tiny", 10)
    v = jax.device_get(model.init(jax.random.key(0), np.zeros((1, 16, 16, 3)), train=False))
    key = features.cache_key(c, v["params"], v["batch_stats"])
    assert features.cache_key(c, v["params"], v["batch_stats"]) == key
    # the data as built (`tlx.data.fingerprint`): a regenerated dataset gets features of its own
    assert features.cache_key(c, v["params"], v["batch_stats"], "0123456789abcdef") != key
    head = {**v["params"], "head": jax.tree.map(lambda x: x + 1, v["params"]["head"])}
    assert features.cache_key(c, head, v["batch_stats"]) == key
    stem = jax.tree.map(lambda x: x, v["params"])
    stem["stem"]["conv1"]["kernel"] = stem["stem"]["conv1"]["kernel"] * 1.0001
    assert features.cache_key(c, stem, v["batch_stats"]) != key
    stats = jax.tree.map(lambda x: x + 1, v["batch_stats"])
    assert features.cache_key(c, v["params"], stats) != key
    for change in ({"data.normalize": "imagenet"}, {"data.image_size": 20}):
        key2 = features.cache_key(cfg(**change), v["params"], v["batch_stats"])
        assert key2 != key, change


def test_cached_probe_trains_the_head_as_the_image_path_does(tmp_path):
    # a data dir of its own: the first cached run must find no cache
    steps = {"total_steps": 30, "data.data_dir": str(tmp_path / "data")}
    images = train.run(cfg(**steps, feature_cache=False), str(tmp_path / "img"))
    cached = train.run(cfg(**steps), str(tmp_path / "feat"))
    again = train.run(cfg(**steps), str(tmp_path / "feat2"))
    assert images["feature_cache"] is None
    assert cached["feature_cache"]["hit"] is False and again["feature_cache"]["hit"] is True
    assert abs(images["test_accuracy"] - cached["test_accuracy"]) <= 0.005
    assert again["test_accuracy"] == cached["test_accuracy"]
    a = train.trained_variables(str(tmp_path / "img"))["params"]
    b = train.trained_variables(str(tmp_path / "feat"))["params"]
    np.testing.assert_allclose(a["head"]["kernel"], b["head"]["kernel"], atol=1e-4)
    for stage in ("stem", "stage1", "stage2", "stage3"):  # the frozen backbone, bit for bit
        jax.tree.map(np.testing.assert_array_equal, a[stage], b[stage])


def test_a_corrupt_feature_cache_is_named_and_rebuilt(tmp_path, caplog):
    steps = {"total_steps": 4, "data.data_dir": str(tmp_path / "data")}
    first = train.run(cfg(**steps), str(tmp_path / "a"))
    path = first["feature_cache"]["path"]
    with open(path, "r+b") as f:  # cut the file in half
        f.truncate(os.path.getsize(path) // 2)
    with caplog.at_level("WARNING"):
        again = train.run(cfg(**steps), str(tmp_path / "b"))
    assert path in caplog.text and "recomputing" in caplog.text
    assert again["feature_cache"]["hit"] is False
    assert again["test_accuracy"] == first["test_accuracy"]
