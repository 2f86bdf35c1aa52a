"""tlx.data's streaming path: the same batches as in memory, exact resume, Inception crop on a
catalog-layout JPEG dataset, fractaldb, and a clear error for each kind of bad dataset."""

import inspect
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from tlx import data
from tlx.data import fractaldb, ops, pipeline, stream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_FRACTALS = dict(num_classes=4, train_per_class=10, test_per_class=5)


def config(data_dir, name="fractals", **overrides):
    cfg = data.default_config()
    cfg.name = name
    cfg.data_dir = str(data_dir)
    cfg.workers = 1
    cfg.fractals.update(SMALL_FRACTALS)
    for key, value in overrides.items():
        target = cfg
        *path, leaf = key.split(".")
        for p in path:
            target = target[p]
        target[leaf] = value
    return cfg


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


# ------------------------------------------------------------------------------------------------
# Streaming fractals against the in-memory path.


@pytest.mark.parametrize("augment", [False, True])
def test_streaming_yields_the_in_memory_batches_value_for_value(data_dir, augment):
    aug = {"augment.crop_padding": 4 if augment else 0, "augment.flip": augment}
    memory = data.load(config(data_dir, in_memory="true", **aug))
    streamed = data.load(config(data_dir, in_memory="false", **aug))
    assert memory.describe()["input"]["path"] == "memory"
    assert memory.describe()["fingerprint"] == streamed.describe()["fingerprint"]
    assert streamed.describe()["input"] == {
        "path": "stream",
        "reason": "data.in_memory=false",
        "workers": 1,
    }
    for split in ("train", "val", "test"):  # the same carve
        np.testing.assert_array_equal(memory.indices[split], streamed.indices[split])
        np.testing.assert_array_equal(memory.labels[split], streamed.labels[split])
    it = streamed.train_iter(8, seed=3)
    try:  # 36 // 8 = 4 batches an epoch: crosses two epoch boundaries
        assert_batches_equal(take(it, 10), take(memory.train_iter(8, seed=3), 10))
    finally:
        it.close()
    for split in ("val", "test"):
        assert_batches_equal(
            list(streamed.eval_batches(split, 6)), list(memory.eval_batches(split, 6))
        )


def test_streaming_resumes_exactly_whatever_the_number_of_workers(data_dir):
    cfg = config(data_dir, in_memory="false")
    one = data.load(cfg)
    cfg.workers = 2
    two = data.load(cfg)
    it = one.train_iter(8, seed=1)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    assert state == {"next_index": 3}
    expected = take(it, 6)
    it.close()
    resumed = two.train_iter(8, seed=1)
    resumed.set_state(state)
    try:
        assert_batches_equal(take(resumed, 6), expected)
    finally:
        resumed.close()


def test_streaming_process_rows_are_the_global_batch(data_dir):
    ds = data.load(config(data_dir, in_memory="false"))
    # The grain dataset behind the iterator, indexed in this process: batch k, no workers.
    full = ds.train_iter(8, seed=5)._dataset
    parts = [ds.train_iter(8, 5, process_index=i, process_count=2)._dataset for i in (0, 1)]
    for k in (0, 5):
        p0, p1 = parts[0][k], parts[1][k]
        np.testing.assert_array_equal(np.concatenate([p0["image"], p1["image"]]), full[k]["image"])
        np.testing.assert_array_equal(np.concatenate([p0["label"], p1["label"]]), full[k]["label"])


def test_in_memory_auto_follows_the_budget_and_the_ops(data_dir, monkeypatch):
    ds = data.load(config(data_dir))
    assert ds.describe()["input"]["path"] == "memory"
    assert ds.describe()["input"]["reason"].startswith("auto: decoded train+test 0.2 MiB <=")
    monkeypatch.setattr(stream, "IN_MEMORY_BUDGET_BYTES", 1000)
    assert data.load(config(data_dir)).describe()["input"]["path"] == "stream"
    monkeypatch.undo()
    crop = data.load(config(data_dir, **{"augment.inception_crop": True}))
    assert crop.describe()["input"]["reason"] == (
        "auto: data.augment.inception_crop needs the images at their stored size"
    )
    assert ds.augments and crop.augments  # pad-crop + flip by default; the Inception crop
    plain = {"augment.crop_padding": 0, "augment.flip": False}
    assert not data.load(config(data_dir, in_memory="false", **plain)).augments
    with pytest.raises(ValueError, match="data.augment.inception_crop needs the images"):
        data.load(config(data_dir, in_memory="true", **{"augment.inception_crop": True}))
    with pytest.raises(ValueError, match="data.in_memory must be"):
        data.load(config(data_dir, in_memory="maybe"))


def test_zero_workers_on_the_streaming_path_is_an_error(data_dir):
    with pytest.raises(ValueError, match=r"data.workers=0: the streaming path .* needs"):
        data.load(config(data_dir, in_memory="false", workers=0))
    data.load(config(data_dir, in_memory="true", workers=0))  # in memory: no workers needed


# ------------------------------------------------------------------------------------------------
# Ops.


def test_inception_crop_box_follows_scale_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, right, bottom = ops._inception_box(300, 200, rng, (0.3, 0.6), (0.5, 2.0))
        w, h = right - left, bottom - top
        assert 0 <= left and right <= 300 and 0 <= top and bottom <= 200
        assert 0.3 * 60000 - 400 <= w * h <= 0.6 * 60000 + 400
        assert 0.5 - 0.02 <= w / h <= 2.0 + 0.02
    # Nothing fits (a very thin image): the central box of the nearest allowed aspect.
    assert ops._inception_box(400, 10, rng, (0.9, 1.0), (0.75, 4 / 3)) == (193, 0, 206, 10)


def test_resize_small_and_central_crop():
    image = Image.fromarray(np.arange(60 * 90 * 3, dtype=np.uint8).reshape(60, 90, 3))
    small = ops.resize_small(image, 40)
    assert small.size == (60, 40)  # (w, h): the shorter side is 40, aspect kept
    crop = ops.central_crop(small, 32)
    np.testing.assert_array_equal(np.asarray(crop), np.asarray(small)[4:36, 14:46])
    with pytest.raises(ValueError, match="central_crop"):
        ops.central_crop(small, 41)


def test_normalisation_is_defined_once():
    from tlx import imagenet

    assert imagenet.NORMALIZATION is ops.NORMALIZATION
    x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
    np.testing.assert_array_equal(ops.normalize(x, "unit"), x * np.float32(1 / 255) * 2 - 1)
    mean, std = pipeline.IMAGENET_MEAN, pipeline.IMAGENET_STD
    np.testing.assert_array_equal(imagenet.normalize(x), (x * np.float32(1 / 255) - mean) / std)
    np.testing.assert_allclose(ops.normalize(x, "tf_lite"), (x - 127.0) / 128.0, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# A catalog-layout dataset: JPEGs of assorted sizes, written with tfds's ordinary builder API.


PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


def _photo_examples(split: str, per_class: int):
    import skimage.data

    rng = np.random.default_rng({"train": 1, "test": 2}[split])
    for label, name in enumerate(PHOTOS):
        photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        for i in range(per_class):
            w, h = int(rng.integers(40, 160)), int(rng.integers(40, 160))
            buf = io.BytesIO()
            photo.resize((w, h), Image.Resampling.BILINEAR).save(buf, format="JPEG", quality=85)
            yield f"{label}_{i}", {"image": buf.getvalue(), "label": label}


class _Catalog(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A catalog-layout builder (JPEG `Image` features); `make_builder` names its variants."""

    VERSION = tfds.core.Version("1.0.0")
    SPLITS = ("train", "test")
    KEYS = ("image", "label")
    CORRUPT = None  # index of a train record whose JPEG is truncated

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):  # see tlx.data.builders.PackagedBuilder
        return epath.Path(inspect.getfile(_Catalog))

    def _info(self):
        image, label = self.KEYS
        features = {
            image: tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            label: tfds.features.ClassLabel(names=list(PHOTOS)),
        }
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(features),
            supervised_keys=self.KEYS if self.KEYS == ("image", "label") else None,
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        return {s: self._generate_examples(s) for s in self.SPLITS}

    def _generate_examples(self, split):
        for i, (key, ex) in enumerate(_photo_examples(split, 60 if split == "train" else 15)):
            if split == "train" and i == self.CORRUPT:
                ex = dict(ex, image=ex["image"][:100])  # a truncated JPEG
            yield key, {self.KEYS[0]: ex["image"], self.KEYS[1]: ex["label"]}


def make_builder(name, **attrs):
    """A `_Catalog` builder class registered as snake_case(``name``), with ``attrs`` set."""
    upper = {k.upper(): v for k, v in attrs.items()}
    return type(name, (_Catalog,), {"__module__": __name__, **upper})


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """240 train + 60 test JPEGs (4 photos, re-encoded at 40..160 px a side)."""
    path = tmp_path_factory.mktemp("catalog")
    make_builder("TlxPhotoCatalog")(data_dir=str(path)).download_and_prepare(
        file_format="array_record"
    )
    return path


def test_catalog_jpegs_stream_with_inception_crop(photos):
    cfg = config(photos, "tlx_photo_catalog", image_size=48, eval_crop_fraction=0.875)
    cfg.augment.update(inception_crop=True, inception_scale=(0.25, 1.0), crop_padding=0)
    ds = data.load(cfg)
    assert ds.describe()["input"]["path"] == "stream" and ds.num_classes == 4
    assert ds.num_examples == {"train": 216, "val": 24, "test": 60}
    it = ds.train_iter(24, seed=0)
    try:
        a, b = take(it, 2)
    finally:
        it.close()
    assert a["image"].shape == (24, 48, 48, 3) and a["image"].dtype == np.float32
    assert a["label"].dtype == np.int32 and set(a["label"]) <= {0, 1, 2, 3}
    assert -1.0 <= a["image"].min() and a["image"].max() <= 1.0
    # Evaluation: resize_small(55) + central_crop(48) of the decoded JPEG, in a fixed order.
    batches = list(ds.eval_batches("test", 16))
    assert [int(b["mask"].sum()) for b in batches] == [16, 16, 16, 12]
    jpeg = next(ex for i, (_, ex) in enumerate(_photo_examples("test", 15)) if i == 0)["image"]
    expected = ops.central_crop(ops.resize_small(ops.decode(jpeg), 55), 48)
    np.testing.assert_array_equal(batches[0]["image"][0], ops.normalize(np.asarray(expected)))


# ------------------------------------------------------------------------------------------------
# Bad datasets: one clear error each.


def test_a_missing_split_is_named(tmp_path):
    make_builder("TlxNoTestCatalog", splits=("train",))(
        data_dir=str(tmp_path)
    ).download_and_prepare(file_format="array_record")
    with pytest.raises(ValueError, match=r"'tlx_no_test_catalog' needs a 'train' split and a"):
        data.load(config(tmp_path, "tlx_no_test_catalog", in_memory="false"))


def test_no_image_label_features_is_named(tmp_path):
    make_builder("TlxNoLabelCatalog", keys=("picture", "kind"))(
        data_dir=str(tmp_path)
    ).download_and_prepare(file_format="array_record")
    with pytest.raises(ValueError, match=r"'tlx_no_label_catalog' has no \(image, label\)"):
        data.load(config(tmp_path, "tlx_no_label_catalog", in_memory="false"))


def test_a_corrupt_record_is_named(tmp_path):
    make_builder("TlxCorruptCatalog", corrupt=7)(data_dir=str(tmp_path)).download_and_prepare(
        file_format="array_record"
    )
    cfg = config(tmp_path, "tlx_corrupt_catalog", in_memory="false", val_fraction=0.0)
    # Loading decodes the records its fingerprint samples (every one of a small split): named.
    with pytest.raises(stream.CorruptRecordError, match=r"train record 7 cannot be read: "):
        data.load(cfg)
    # A record outside the sample is named when a batch decodes it (opened without loading.load,
    # which would have named it first here).
    data_dir, params = pipeline.resolve_data_dir(cfg), pipeline.builder_params(cfg)
    ds = stream.StreamingDataset.open(cfg, data_dir, params, "test")  # labels only: fine
    with pytest.raises(stream.CorruptRecordError, match=r"train record 7: cannot decode image"):
        list(ds.eval_batches("train", 16))


# ------------------------------------------------------------------------------------------------
# fractaldb.


FDB = dict(num_classes=3, train_per_class=30, test_per_class=5, resolution=32, workers=1)


def test_fractaldb_builds_deterministically_and_streams(tmp_path, monkeypatch):
    a = fractaldb.prepare(str(tmp_path / "a"), **FDB)
    monkeypatch.setattr(fractaldb, "_IMAGES_PER_SHARD", 30)
    b = fractaldb.prepare(str(tmp_path / "b"), **dict(FDB, workers=2))  # two render processes
    assert len(list(epath.Path(b.data_dir).glob("fractaldb-train.array_record-*-of-00003"))) == 3
    for split, n in (("train", 90), ("test", 15)):
        xa = a.as_data_source(split).__getitems__(range(n))
        xb = b.as_data_source(split).__getitems__(range(n))
        images = np.stack([ex["image"] for ex in xa])
        assert images.shape == (n, 32, 32, 3)
        np.testing.assert_array_equal(images, np.stack([ex["image"] for ex in xb]))
        labels = [int(ex["label"]) for ex in xa]
        assert labels == sorted(labels) and np.bincount(labels).tolist() == [n // 3] * 3
        filled = (images.max(-1) > 0).mean((1, 2))
        assert filled.min() > 0.02 and filled.max() < 0.9
    cfg = config(tmp_path / "a", "fractaldb", in_memory="false")
    cfg.fractaldb.update(FDB)
    ds = data.load(cfg)
    assert ds.num_classes == 3 and ds.num_examples == {"train": 81, "val": 9, "test": 15}
    (cached,) = (tmp_path / "a" / "tlx_labels").glob("fractaldb_c3_tr30_te5_r32_s0_1.0.0_*/")
    np.testing.assert_array_equal(np.load(cached / "train.npy"), np.repeat([0, 1, 2], 30))
    # Categories are a prefix of one seeded sequence, whatever their number.
    two = fractaldb.systems(0, 2)
    assert all(np.array_equal(x, y) for x, y in zip(two, fractaldb.systems(0, 3), strict=False))
    assert all(2 <= len(c) <= 7 for c in two)


def test_fractaldb_instances_vary_by_weight_flip_and_patch():
    coef = fractaldb.systems(0, 1)[0]
    images = fractaldb.render(coef, 0, "train", range(100), 32, 0)
    # Instance 25 is instance 0 (no weight variation, same render seed) flipped left-right.
    np.testing.assert_array_equal(images[25], images[0][:, ::-1])
    np.testing.assert_array_equal(images[50], images[0][::-1])
    assert not np.array_equal(images[1], images[0])  # a weight variation
    again = fractaldb.render(coef, 0, "train", range(20, 30), 32, 0)
    np.testing.assert_array_equal(again, images[20:30])  # independent of the chunking


# ------------------------------------------------------------------------------------------------
# kill -9 mid-epoch, resume: the same final params as an uninterrupted run.


KILL_RUN = {
    "data.name": "tlx_photo_catalog",
    "data.workers": 1,
    "data.augment.inception_crop": True,
    "data.augment.crop_padding": 0,
    "data.eval_crop_fraction": 0.875,
    "optim.schedule": "constant",
    "checkpoint_every": 5,
    "eval_every": 0,
    "eval_train": False,
}
KILL_SPEC = "configs/pretrain.py:steps=24,batch_size=16,image_size=48"


@pytest.mark.slow
def test_streaming_run_killed_mid_epoch_resumes_to_the_same_params(photos, tmp_path):
    """The catalog JPEGs at 48 px with Inception crop, through the train loop: killed with
    SIGKILL after a checkpoint, resumed, the same params as a run never interrupted."""
    import jax

    from tlx import checkpoint, train
    from tlx import config as tlx_config

    settings = {**KILL_RUN, "data.data_dir": str(photos)}

    def run(workdir):
        c = tlx_config.load(os.path.join(ROOT, KILL_SPEC), progress=False, tensorboard=False)
        for key, value in settings.items():
            *parents, leaf = key.split(".")
            node = c
            for p in parents:
                node = node[p]
            node[leaf] = value
        return train.run(c, str(workdir))

    full, killed = tmp_path / "full", tmp_path / "killed"
    run(full)
    # 216 train examples / 16 = 13 steps an epoch; checkpoints at 5, 10, 15, 20: all mid-epoch.
    flags = [
        f"--config.{k}={v if isinstance(v, str) else str(v).lower()}" for k, v in settings.items()
    ]
    cmd = [sys.executable, "-m", "tlx.main", f"--config={KILL_SPEC}", f"--workdir={killed}"]
    proc = subprocess.Popen(
        cmd + flags + ["--config.progress=false"],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "5").is_dir() and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "summary.json").exists(), "the run ended before it could be killed"
    summary = run(killed)
    assert summary["resumed_from"] in (5, 10, 15, 20)
    assert summary["dataset"]["input"]["path"] == "stream"
    assert summary["dataset"]["num_classes"] == 4 and summary["dataset"]["image_shape"] == [
        48,
        48,
        3,
    ]
    a, b = checkpoint.read_variables(str(full)), checkpoint.read_variables(str(killed))
    jax.tree.map(np.testing.assert_array_equal, a, b)


# ------------------------------------------------------------------------------------------------
# The source-scale study's cells.


def test_source_scale_study_cells():
    from tlx import config as tlx_config

    study = tlx_config.load_module(os.path.join(ROOT, "configs/source_scale.py"), "study")
    cells = study.get_sweep()
    sources = [c for c in cells if c["name"].startswith("source/")]
    assert [c["name"] for c in sources] == [
        "source/10x1000",
        "source/100x100",
        "source/1000x10",
        "source/100x1000",
    ]
    assert len(cells) == 4 + 2 * (4 * 3 + 1) * 3
    runs = [c for c in cells if "init_from" in c]
    assert {c["init_from"] for c in runs} == {c["name"] for c in sources}
    assert {c["axes"]["source_images"] for c in runs} == {10_000, 100_000}
    with pytest.raises(ValueError, match="'10by10' is not CxN"):
        study.get_sweep("sources=10by10")


def test_a_corrupt_array_record_file_is_named(photos, tmp_path):
    import shutil

    shutil.copytree(photos, tmp_path, dirs_exist_ok=True)
    (shard,) = (tmp_path / "tlx_photo_catalog" / "1.0.0").glob("*-train.array_record-*")
    with open(shard, "r+b") as f:  # overwrite bytes in the middle of the file
        f.seek(shard.stat().st_size // 2)
        f.write(b"\xff" * 64)
    with pytest.raises(stream.CorruptRecordError, match=r"train record \d+ cannot be read: "):
        ds = data.load(config(tmp_path, "tlx_photo_catalog", in_memory="false", val_fraction=0.0))
        list(ds.eval_batches("train", 64))  # labels may be cached: the images are read here
