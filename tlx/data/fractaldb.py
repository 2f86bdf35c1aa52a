"""FractalDB (Kataoka et al., ACCV 2020 / IJCV 2022) at a chosen scale: up to 1000 categories x
1000 instances, rendered in colour at a chosen resolution, as a TFDS builder.

Categories: iterated function systems from a filling-rate search, as in the reference code. A
candidate has 2-7 affine maps ``x -> A x + b`` whose six coefficients are uniform in (-1, 1), map
probabilities proportional to |det A|; it is accepted when ``SEARCH_POINTS`` chaos-game points,
framed by their min/max, fill at least ``MIN_FILL`` of a ``SEARCH_GRID``^2 grid (the reference's
100k points on 512^2 at >= 20%, at the same points per pixel). Accepted system k is category k
of an infinite sequence seeded by ``system_seed``: a config with 10 categories takes the first 10
of the 1000.

Instances: instance i of a category takes the reference's three variations, 25 x 4 x 10 = 1000:
``i % 25`` picks a weight variation (none, or one of the six coefficients of every map scaled by
0.8 / 0.9 / 1.1 / 1.2), ``(i // 25) % 4`` a flip (none, left-right, up-down, both), ``i // 100``
a render seed (the points drawn, each map's colour, and at >= 96 px the 3x3 patch each point is
stamped with; below that a point is one pixel). Every image is framed by its own min/max.

Each image depends only on (system_seed, category, split, instance), so the build is the same
whatever the number of worker processes; it renders in ``workers`` processes (one per core by
default) with a progress bar, stores PNGs (decoded with Pillow), and tfds shards the
array_record files. Bump VERSION whenever what is rendered changes.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from tlx.data import builders
from tlx.data.builders import PackagedBuilder

MIN_FILL = 0.2
SEARCH_GRID = 128
SEARCH_POINTS = 6250  # 100k points / 512^2 pixels, at 128^2
_MAPS = (2, 8)  # 2..7 maps
_WEIGHT_FACTORS = (0.8, 0.9, 1.1, 1.2)
_POINTS_PER_PIXEL = 0.8  # the reference: 100k points on 362^2 images
_MIN_POINTS = 500
_WALKERS = 50
_BURN_IN = 10
_PATCH_FROM = 96  # resolution from which points are stamped as 3x3 patches
_SPLIT_IDS = {"train": 1, "test": 2}
_TASK_IMAGES = 50  # images rendered per task of the worker pool
_IMAGES_PER_SHARD = 10_000  # train images per array_record shard (1M: 100 shards)


# ------------------------------------------------------------------------------------------------
# Chaos game.


def _probs(a: np.ndarray) -> np.ndarray:
    w = np.abs(np.linalg.det(a))  # [..., n]
    w = np.where(w.sum(-1, keepdims=True) > 0, w, 1.0)
    return w / w.sum(-1, keepdims=True)


def chaos_game(coef: np.ndarray, uniforms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points of M systems at once.

    Args:
      coef: [M, n, 6] maps (a11, a12, a21, a22, b1, b2).
      uniforms: [M, T, W] uniforms in [0, 1) choosing the map of each of W walkers at each of
        T steps (the first _BURN_IN steps are not recorded).
    Returns:
      (points [2, M, (T - _BURN_IN) * W], map index [M, (T - _BURN_IN) * W]).
    """
    m, n, _ = coef.shape
    t_steps, w = uniforms.shape[1:]
    cum = np.cumsum(_probs(coef[..., :4].reshape(m, n, 2, 2)), -1)  # [M, n]
    flat = coef.reshape(m * n, 6).T.copy()  # [6, M*n]
    base = np.arange(m)[:, None] * n
    x = np.zeros((m, w))
    y = np.zeros((m, w))
    recorded = t_steps - _BURN_IN
    out = np.empty((2, m, recorded, w))
    which = np.empty((m, recorded, w), np.int8)
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(t_steps):
            k = (uniforms[:, t, :, None] > cum[:, None, :]).sum(-1).clip(max=n - 1)  # [M, W]
            c0, c1, c2, c3, c4, c5 = flat[:, base + k]
            x, y = c0 * x + c1 * y + c4, c2 * x + c3 * y + c5
            if t >= _BURN_IN:
                out[0, :, t - _BURN_IN], out[1, :, t - _BURN_IN] = x, y
                which[:, t - _BURN_IN] = k
    return out.reshape(2, m, recorded * w), which.reshape(m, recorded * w)


def _pixels(points: np.ndarray, resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[2, M, P] -> cols, rows [M, P] framed per system by its min/max, and a validity mask."""
    ok = np.isfinite(points).all(0) & (np.abs(points) < 1e6).all(0)
    safe = np.where(ok, points, np.nan)
    with np.errstate(invalid="ignore"):
        lo, hi = np.nanmin(safe, -1, keepdims=True), np.nanmax(safe, -1, keepdims=True)
    lo, hi = np.nan_to_num(lo), np.nan_to_num(hi)
    span = np.maximum(hi - lo, 1e-9)
    pix = np.floor((np.nan_to_num(safe) - lo) / span * (resolution - 1) + 0.5).astype(np.int64)
    ok &= ((pix >= 0) & (pix < resolution)).all(0)
    return pix[0], pix[1], ok


def _fills(coefs: list[np.ndarray], uniforms: np.ndarray) -> np.ndarray:
    """Filling rates of candidate systems (maps [n_k, 6] each), evaluated together: the maps are
    padded with zero maps, whose probability (|det| = 0) is zero."""
    n = max(len(c) for c in coefs)
    padded = np.zeros((len(coefs), n, 6))
    for k, c in enumerate(coefs):
        padded[k, : len(c)] = c
    points, _ = chaos_game(padded, uniforms)
    col, row, ok = _pixels(points, SEARCH_GRID)
    fills = np.zeros(len(coefs))
    for k in range(len(coefs)):
        if ok[k].mean() >= 0.99:  # else it diverges
            grid = np.zeros((SEARCH_GRID, SEARCH_GRID), bool)
            grid[row[k, ok[k]], col[k, ok[k]]] = True
            fills[k] = grid.mean()
    return fills


@functools.lru_cache(maxsize=8)
def _search(system_seed: int, count: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng([system_seed, 0xFDB])
    steps = _BURN_IN + SEARCH_POINTS // _WALKERS
    accepted = []
    while len(accepted) < count:
        # 64 candidates at a time, each drawn in turn (maps, coefficients, its walk), accepted
        # in order: the sequence is the one a one-at-a-time search would give.
        coefs, uniforms = [], []
        for _ in range(64):
            coefs.append(rng.uniform(-1.0, 1.0, (int(rng.integers(*_MAPS)), 6)))
            uniforms.append(rng.random((steps, _WALKERS)))
        for coef, fill in zip(coefs, _fills(coefs, np.stack(uniforms)), strict=True):
            if fill >= MIN_FILL and len(accepted) < count:
                coef.flags.writeable = False
                accepted.append(coef)
    return tuple(accepted)


def systems(system_seed: int, count: int) -> list[np.ndarray]:
    """The first ``count`` categories of the sequence for ``system_seed``: [n, 6] each."""
    return list(_search(system_seed, count))


# ------------------------------------------------------------------------------------------------
# Rendering.


def num_points(resolution: int) -> int:
    return max(_MIN_POINTS, int(round(_POINTS_PER_PIXEL * resolution * resolution)))


def render(
    coef: np.ndarray, category: int, split: str, instances: range, resolution: int, seed: int
) -> np.ndarray:
    """Instances ``instances`` of the category with maps ``coef``: uint8 [len, R, R, 3]."""
    m, n = len(instances), len(coef)
    coef = np.asarray(coef, np.float64)
    steps = _BURN_IN + -(-num_points(resolution) // _WALKERS)
    coefs = np.repeat(coef[None], m, 0)  # [M, n, 6]
    uniforms = np.empty((m, steps, _WALKERS))
    colours = np.empty((m, n, 3), np.uint8)
    patches = np.empty((m, 3, 3), bool)
    for j, i in enumerate(instances):
        weight, render_seed = i % 25, i // 100  # the flip is applied to the render below
        if weight:
            coefs[j, :, (weight - 1) // 4] *= _WEIGHT_FACTORS[(weight - 1) % 4]
        rng = np.random.default_rng([seed, category, _SPLIT_IDS[split], render_seed, weight])
        uniforms[j] = rng.random((steps, _WALKERS))
        colour = rng.uniform(0.2, 1.0, (n, 3))
        colours[j] = np.round(colour / colour.max(-1, keepdims=True) * 255)
        patches[j] = rng.random((3, 3)) < 0.5
        patches[j, 1, 1] = True
    points, which = chaos_game(coefs, uniforms)
    col, row, ok = _pixels(points, resolution)
    images = np.zeros((m, resolution, resolution, 3), np.uint8)
    inst = np.broadcast_to(np.arange(m)[:, None], ok.shape)
    values = colours[inst, which.astype(np.int64)]  # [M, P, 3]
    if resolution < _PATCH_FROM:
        images[inst[ok], row[ok], col[ok]] = values[ok]
    else:
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                on = ok & patches[inst, dy + 1, dx + 1]
                r, c = (row + dy).clip(0, resolution - 1), (col + dx).clip(0, resolution - 1)
                images[inst[on], r[on], c[on]] = values[on]
    for j, i in enumerate(instances):
        flip = (i // 25) % 4
        if flip & 1:
            images[j] = images[j, :, ::-1]
        if flip & 2:
            images[j] = images[j, ::-1]
    return images


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _render_task(task) -> list[bytes]:
    coef, category, split, start, stop, resolution, seed = task
    images = render(coef, category, split, range(start, stop), resolution, seed)
    return [encode_png(im) for im in images]


# ------------------------------------------------------------------------------------------------
# The TFDS builder.


@dataclasses.dataclass
class FractalDBConfig(tfds.core.BuilderConfig):
    num_classes: int = 1000
    train_per_class: int = 1000
    test_per_class: int = 100
    resolution: int = 32
    system_seed: int = 0
    workers: int = 0  # not part of the name: the data doesn't depend on it


def make_config(
    num_classes: int = 1000,
    train_per_class: int = 1000,
    test_per_class: int = 100,
    resolution: int = 32,
    system_seed: int = 0,
    workers: int = 0,
) -> FractalDBConfig:
    name = f"c{num_classes}_tr{train_per_class}_te{test_per_class}_r{resolution}_s{system_seed}"
    return FractalDBConfig(
        name=name,
        description=f"FractalDB categories x instances ({name})",
        num_classes=int(num_classes),
        train_per_class=int(train_per_class),
        test_per_class=int(test_per_class),
        resolution=int(resolution),
        system_seed=int(system_seed),
        workers=int(workers),
    )


class FractalDB(PackagedBuilder):
    """FractalDB: IFS categories from a filling-rate search, instances by weight / flip / patch
    variation, PNG-encoded (see the module docstring)."""

    name = "fractaldb"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=(c.resolution, c.resolution, 3), encoding_format="png"
                    ),
                    "label": tfds.features.ClassLabel(num_classes=c.num_classes),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # record i of a split is the i-th image generated
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        c = self.builder_config
        cats = systems(c.system_seed, c.num_classes)
        return {
            "train": self._generate_examples(cats, "train", c.train_per_class),
            "test": self._generate_examples(cats, "test", c.test_per_class),
        }

    def _generate_examples(self, cats, split: str, per_class: int):
        from tqdm import tqdm

        c = self.builder_config
        tasks = [
            (
                coef,
                k,
                split,
                start,
                min(start + _TASK_IMAGES, per_class),
                c.resolution,
                c.system_seed,
            )
            for k, coef in enumerate(cats)
            for start in range(0, per_class, _TASK_IMAGES)
        ]
        workers = c.workers or os.cpu_count() or 1
        bar = tqdm(total=len(cats) * per_class, desc=f"fractaldb {c.name} {split}", unit="img")
        pool = None
        if workers > 1 and len(tasks) > 1:
            import multiprocessing

            pool = multiprocessing.get_context("spawn").Pool(min(workers, len(tasks)))
        try:
            results = pool.imap(_render_task, tasks) if pool else map(_render_task, tasks)
            for (_, k, _, start, _, _, _), pngs in zip(tasks, results, strict=True):
                for i, png in enumerate(pngs, start):
                    yield f"{k:04d}_{i:06d}", {"image": png, "label": k}
                bar.update(len(pngs))
        finally:
            bar.close()
            if pool:
                pool.terminate()


def prepare(data_dir: str, **params) -> tfds.core.DatasetBuilder:
    """The built `FractalDB` for ``params`` (the fields of ``config.data.fractaldb``)."""
    config = make_config(**params)
    # tfds 4.9.10 reads min/max_shard_size from the class, not the DownloadConfig (its
    # `calculate_number_shards` is a classmethod): only `num_shards` takes effect. It applies to
    # both splits, so it is capped by the test split's size.
    train, test = (
        config.num_classes * config.train_per_class,
        config.num_classes * config.test_per_class,
    )
    shards = max(1, min(train // _IMAGES_PER_SHARD, test))
    download = tfds.download.DownloadConfig(try_download_gcs=False, num_shards=shards)
    return builders.prepare(FractalDB, data_dir, config, download_config=download)
