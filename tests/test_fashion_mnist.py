"""Fashion-MNIST (`tlx.data.fashion_mnist`): the builder over idx files, its checks and errors, the
`make fashion-mnist` install step, and the input every real target gives an ImageNet backbone.

Most tests write tiny idx files (2 train and 1 test image per class) and point the checks at
them; the tests of the real files run where `make fashion-mnist` has installed them.
"""

import gzip
import hashlib
import os
import re

import numpy as np
import pytest
from PIL import Image

from tlx import config as tlx_config
from tlx import data
from tlx import main as tlx_main
from tlx.data import builders, fashion_mnist, pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_PER_CLASS = {"train": 2, "test": 1}
# torchvision's ImageNet statistics (transforms.Normalize in its reference scripts).
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def idx_bytes(array: np.ndarray) -> bytes:
    """LeCun's idx format: 0x0000, type 0x08 (uint8), ndim, big-endian int32 sizes, the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def tiny_arrays(seed=0) -> dict:
    """{split: (images uint8 [N, 28, 28], labels uint8 [N])}, TINY_PER_CLASS of each class."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, k in TINY_PER_CLASS.items():
        labels = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), k))
        out[split] = (rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8), labels)
    return out


def write_files(where, arrays: dict) -> dict:
    """The four .gz files of ``arrays`` in ``where``; returns {file name: sha256 of content}."""
    os.makedirs(where, exist_ok=True)
    digests = {}
    for split, (image_file, label_file) in fashion_mnist.FILES.items():
        for name, array in zip((image_file, label_file), arrays[split], strict=True):
            raw = idx_bytes(array)
            with gzip.open(os.path.join(where, name), "wb") as f:
                f.write(raw)
            digests[name] = hashlib.sha256(raw).hexdigest()
    return digests


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A data dir holding tiny files where the builder reads them, the checks expecting them."""
    arrays = tiny_arrays()
    digests = write_files(fashion_mnist.files_dir(str(tmp_path)), arrays)
    monkeypatch.setattr(fashion_mnist, "SHA256", digests)
    monkeypatch.setattr(fashion_mnist, "PER_CLASS", TINY_PER_CLASS)
    return str(tmp_path), arrays


def stored(data_dir) -> dict:
    builder = pipeline.open_builder("fashion_mnist", data_dir)
    out = {}
    for split, source in builder.as_data_source().items():
        examples = source.__getitems__(range(len(source)))
        out[split] = (np.stack([e["image"] for e in examples]), [e["label"] for e in examples])
    return out


def is_built(data_dir) -> bool:
    return os.path.exists(os.path.join(data_dir, "fashion_mnist", "1.0.0", "dataset_info.json"))


def test_builds_the_files_splits_in_file_order(tiny):
    data_dir, arrays = tiny
    got = stored(data_dir)
    assert sorted(got) == ["test", "train"]
    for split, (images, labels) in arrays.items():
        np.testing.assert_array_equal(got[split][0], images[..., None])
        assert got[split][1] == labels.tolist()
    info = pipeline.open_builder("fashion_mnist", data_dir).info
    assert info.features["label"].names[0] == "T-shirt/top"
    assert info.features["label"].names[9] == "Ankle boot"


def test_a_file_whose_sha256_differs_is_refused_and_nothing_is_built(tiny):
    data_dir, arrays = tiny
    images, labels = arrays["test"]
    changed = images.copy()
    changed[0, 0, 0] ^= 1  # one bit of one pixel
    where = fashion_mnist.files_dir(data_dir)
    with gzip.open(os.path.join(where, "t10k-images-idx3-ubyte.gz"), "wb") as f:
        f.write(idx_bytes(changed))
    with pytest.raises(
        ValueError, match=r"t10k-images-idx3-ubyte.gz has sha256 .*make fashion-mnist"
    ):
        pipeline.open_builder("fashion_mnist", data_dir)
    assert not is_built(data_dir)


def test_class_counts_other_than_expected_are_refused(tmp_path, monkeypatch):
    arrays = tiny_arrays()
    images, labels = arrays["train"]
    labels = labels.copy()
    labels[labels == 1] = 0  # class 0 four times, class 1 never
    arrays["train"] = (images, labels)
    digests = write_files(fashion_mnist.files_dir(str(tmp_path)), arrays)
    monkeypatch.setattr(fashion_mnist, "SHA256", digests)  # the sha256 matches: counts refuse
    monkeypatch.setattr(fashion_mnist, "PER_CLASS", TINY_PER_CLASS)
    with pytest.raises(ValueError, match=r"train has \[4, 0, 2, .*expected 2 for each"):
        pipeline.open_builder("fashion_mnist", str(tmp_path))
    assert not is_built(str(tmp_path))


def test_a_split_of_another_size_is_refused(tmp_path, monkeypatch):
    arrays = tiny_arrays()
    digests = write_files(fashion_mnist.files_dir(str(tmp_path)), arrays)
    monkeypatch.setattr(fashion_mnist, "SHA256", digests)
    monkeypatch.setattr(fashion_mnist, "PER_CLASS", {"train": 3, "test": 1})
    with pytest.raises(
        ValueError, match=r"train has images \(20, 28, 28\).*expected \(30, 28, 28\)"
    ):
        pipeline.open_builder("fashion_mnist", str(tmp_path))


def test_missing_files_give_one_line_naming_the_make_target_and_the_directory(tmp_path):
    with pytest.raises(data.DatasetNotPreparedError) as e:
        pipeline.open_builder("fashion_mnist", str(tmp_path))
    message = str(e.value)
    assert "\n" not in message
    assert "`make fashion-mnist`" in message
    assert fashion_mnist.files_dir(str(tmp_path)) in message
    assert "train-images-idx3-ubyte.gz" in message


def test_a_run_without_the_files_exits_with_that_line(tmp_path, capsys, monkeypatch):
    spec = "configs/finetune.py:target=fashion_mnist,steps=2,batch_size=8,image_size=16"
    argv = [f"--config={spec}", f"--workdir={tmp_path / 'run'}",
            f"--config.data.data_dir={tmp_path / 'empty'}", "--config.progress=false"]  # fmt: skip
    monkeypatch.chdir(ROOT)  # configs/ paths are relative to the repository
    status = tlx_main.main(argv)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("tlx.main:")]
    assert status == 1
    assert len(lines) == 1 and re.search(r"DatasetNotPreparedError: .*make fashion-mnist", lines[0])


def test_val_carve_and_examples_per_class_come_from_its_train_split(tiny):
    data_dir, arrays = tiny
    cfg = data.default_config()
    cfg.update(name="fashion_mnist", data_dir=data_dir, image_size=28, examples_per_class=1)
    ds = data.load(cfg)
    # 2 train images per class: the stratified val carve takes 1 (at least one per class), the
    # subsample the other; test is the files' own test split.
    assert ds.num_examples == {"train": 10, "val": 10, "test": 10}
    assert np.bincount(ds.labels["train"]).tolist() == [1] * 10
    assert not set(ds.indices["train"]) & set(ds.indices["val"])
    np.testing.assert_array_equal(ds.labels["test"], arrays["test"][1])


def test_install_checks_the_files_then_copies_them_and_writes_the_stamp(tmp_path, monkeypatch):
    source = str(tmp_path / "deb")
    monkeypatch.setattr(fashion_mnist, "SHA256", write_files(source, tiny_arrays()))
    monkeypatch.setattr(fashion_mnist, "PER_CLASS", TINY_PER_CLASS)
    where = fashion_mnist.install(source, str(tmp_path / "data"))
    assert where == fashion_mnist.files_dir(str(tmp_path / "data"))
    assert sorted(os.listdir(where)) == sorted([fashion_mnist.STAMP, *fashion_mnist.SHA256])
    for name in fashion_mnist.SHA256:
        with (
            open(os.path.join(where, name), "rb") as a,
            open(os.path.join(source, name), "rb") as b,
        ):
            assert a.read() == b.read()


def test_install_refuses_a_wrong_file_and_installs_nothing(tmp_path, monkeypatch):
    source = str(tmp_path / "deb")
    digests = write_files(source, tiny_arrays())
    digests["train-labels-idx1-ubyte.gz"] = "0" * 64
    monkeypatch.setattr(fashion_mnist, "SHA256", digests)
    monkeypatch.setattr(fashion_mnist, "PER_CLASS", TINY_PER_CLASS)
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz has sha256"):
        fashion_mnist.install(source, str(tmp_path / "data"))
    assert not os.path.exists(fashion_mnist.files_dir(str(tmp_path / "data")))


# ------------------------------------------------------------------------------------------------
# What a pretrained backbone reads, for every real target.


@pytest.mark.parametrize("target", pipeline.REAL_TARGETS)
def test_every_real_target_into_mobilenet_v2_is_resized_rgb_with_imagenet_statistics(target, tiny):
    size = 20
    c = tlx_config.load(
        f"configs/finetune.py:backbone=mobilenet_v2,init_from=imagenet,target={target},"
        f"image_size={size}"
    )
    if target == "fashion_mnist":  # the tiny files; the others build under $TLX_DATA_DIR
        c.data.data_dir = tiny[0]
    ds = data.load(c.data)
    batch = next(ds.eval_batches("test", 4))
    assert batch["image"].shape == (4, size, size, 3)
    raw = pipeline.open_builder(target, pipeline.resolve_data_dir(c.data))
    first = raw.as_data_source("test")[0]["image"]  # grey uint8 [H, W, 1], native size
    rgb = Image.fromarray(first[..., 0]).convert("RGB").resize((size, size), Image.BILINEAR)
    expected = (np.asarray(rgb, np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(batch["image"][0], expected, atol=1e-5)


def test_efficientnet_lite0_reads_its_own_normalisation():
    c = tlx_config.load("configs/finetune.py:backbone=efficientnet_lite0,init_from=imagenet")
    assert (c.data.channels, c.data.normalize) == (3, "tf_lite")  # (x - 127) / 128


# ------------------------------------------------------------------------------------------------
# The real files, where `make fashion-mnist` installed them.


def _installed_dir() -> str | None:
    # tests/conftest.py points $TLX_DATA_DIR at a temporary dir unless the user set it, so the
    # make target's default place is looked at too.
    for root in (builders.default_data_dir(), os.path.expanduser(builders.DEFAULT_DATA_DIR)):
        where = fashion_mnist.files_dir(root)
        if not fashion_mnist.missing_files(where):
            return where
    return None


REAL = _installed_dir()
needs_real = pytest.mark.skipif(
    REAL is None, reason="Fashion-MNIST not installed: make fashion-mnist"
)


@needs_real
@pytest.mark.parametrize("split, n, per_class", [("train", 60000, 6000), ("test", 10000, 1000)])
def test_real_files_pass_their_sha256_and_hold_per_class(split, n, per_class):
    images, labels = fashion_mnist.read_split(REAL, split)  # raises on a sha256 mismatch
    assert images.shape == (n, 28, 28, 1) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [per_class] * 10
    assert images.max() == 255 and images.min() == 0


@needs_real
def test_real_build_has_the_recorded_fingerprint(tmp_path):
    where = fashion_mnist.files_dir(str(tmp_path))
    os.makedirs(where)
    for name in fashion_mnist.SHA256:
        os.symlink(os.path.join(REAL, name), os.path.join(where, name))
    cfg = data.default_config()
    cfg.update(name="fashion_mnist", data_dir=str(tmp_path))
    # The data as built (tlx.data.fingerprint): what a study's summary.json records; it changes
    # only if the files or how they are built change.
    assert data.fingerprint(cfg) == "1c678a311789d020"
