"""A procedural pre-training source in the spirit of FractalDB (Kataoka et al., ACCV 2020).

Each class is one iterated function system (IFS): 2-4 random contractive affine maps
``x -> A x + b``. The systems form an infinite, seeded sequence: candidate systems are drawn one
after another from ``np.random.default_rng(system_seed)`` and kept only if their attractor,
scaled to the grid, fills at least ``MIN_FILL`` of it; accepted system ``k`` is class ``k``. A
builder config takes the window ``class_offset .. class_offset + num_classes - 1`` of that
sequence, so ``class_offset=30`` gives 30 classes disjoint from the default 30 (a target that is
similar to the source but new).

Instances of a class vary by per-instance noise on the map parameters, rotation, scale, shift
and colour. Rendering is a chaos game vectorised over all instances of a class at once: every
walker starts on the attractor (at the fixed point of one of the maps), so no burn-in is needed
beyond a few mixing steps.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from tlx.data.builders import PackagedBuilder

MIN_FILL = 0.08  # fraction of the grid the canonical attractor must cover
_ACCEPT_RESOLUTION = 32  # acceptance is judged at a fixed size, so it doesn't depend on the config
_MAX_SINGULAR = 0.95  # every map is scaled to be at least this contractive
_PARAM_NOISE = 0.04  # std of per-instance noise on A and b
_MAX_ROTATION = np.deg2rad(30.0)
_SCALE_RANGE = (0.75, 1.0)
_MAX_SHIFT = 0.1  # in units of the half-extent of the attractor
_NUM_POINTS = 3000
_WALKERS = 100
_MIX_STEPS = 4  # steps before recording; walkers already start on the attractor
_SPLIT_IDS = {"train": 1, "test": 2}


# ------------------------------------------------------------------------------------------------
# Iterated function systems.


def _contract(a: np.ndarray) -> np.ndarray:
    """Scales each 2x2 map in ``a[..., 2, 2]`` so its largest singular value is <= _MAX_SINGULAR."""
    s = np.linalg.svd(a, compute_uv=False)[..., 0]
    return a * np.minimum(1.0, _MAX_SINGULAR / np.maximum(s, 1e-12))[..., None, None]


def _map_probs(a: np.ndarray) -> np.ndarray:
    """Chaos-game probabilities proportional to |det A| (as in FractalDB), with a floor."""
    w = np.abs(np.linalg.det(a)) + 0.02
    return w / w.sum(-1, keepdims=True)


def _sample_system(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n = int(rng.integers(2, 5))
    a = _contract(rng.uniform(-1.0, 1.0, (n, 2, 2)))
    b = rng.uniform(-1.0, 1.0, (n, 2))
    return a, b


def _chaos_game(a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Points on the attractors of M systems at once.

    Args:
      a: [M, n, 2, 2] linear parts; b: [M, n, 2] offsets (every system has n maps).
    Returns:
      [2, M, P] point coordinates (x, y), P = _NUM_POINTS.
    """
    m, n = a.shape[:2]
    steps = _NUM_POINTS // _WALKERS
    cum = np.cumsum(_map_probs(a), -1)  # [M, n]
    # The six affine coefficients as separate flat arrays: one gather each per step, which is
    # several times faster than gathering [.., 2, 2] blocks and calling einsum.
    coef = np.concatenate([a.reshape(m, n, 4), b], -1).reshape(m * n, 6).T.copy()  # [6, M*n]
    base = np.arange(m)[:, None] * n
    # Every walker starts at the fixed point x = (I - A)^-1 b of a random map: on the attractor.
    fixed = np.linalg.solve(np.eye(2) - a, b[..., None])[..., 0].reshape(m * n, 2)
    start = fixed[base + rng.integers(0, n, (m, _WALKERS))]  # [M, W, 2]
    x, y = start[..., 0], start[..., 1]
    out = np.empty((2, m, steps, _WALKERS))
    for t in range(_MIX_STEPS + steps):
        k = (rng.random((m, _WALKERS, 1)) > cum[:, None, :]).sum(-1).clip(max=n - 1)  # [M, W]
        c0, c1, c2, c3, c4, c5 = coef[:, base + k]
        x, y = c0 * x + c1 * y + c4, c2 * x + c3 * y + c5
        if t >= _MIX_STEPS:
            out[0, :, t - _MIX_STEPS], out[1, :, t - _MIX_STEPS] = x, y
    return out.reshape(2, m, steps * _WALKERS)


def _frame(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Centre [2, 1] and half-extent that map points [2, P] onto [-1, 1]^2 (aspect kept).

    The 1st-99th percentiles, not the extremes: a sparse halo of rarely visited points would
    otherwise shrink the dense body of the attractor to a few pixels.
    """
    lo, hi = np.percentile(points, [1.0, 99.0], axis=-1, keepdims=True)
    return (lo + hi) / 2, float(max((hi - lo).max() / 2, 1e-6))


def _to_pixels(q: np.ndarray, resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[2, ...] coordinates in [-1, 1] -> pixel cols, rows and an in-bounds mask (5% margin)."""
    pix = np.floor(q * (0.45 * resolution) + 0.5 * resolution).astype(np.int32)
    ok = ((pix >= 0) & (pix < resolution)).all(0)
    return pix[0], pix[1], ok


def _fill(points: np.ndarray, resolution: int) -> float:
    centre, half = _frame(points)
    col, row, ok = _to_pixels((points - centre) / half, resolution)
    grid = np.zeros((resolution, resolution), bool)
    grid[row[ok], col[ok]] = True
    return float(grid.mean())


def systems(system_seed: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The first ``count`` accepted systems of the sequence for ``system_seed``: (A, b) pairs."""
    rng = np.random.default_rng(system_seed)
    accepted = []
    while len(accepted) < count:
        a, b = _sample_system(rng)
        pts = _chaos_game(a[None], b[None], rng)[:, 0]
        if np.isfinite(pts).all() and _fill(pts, _ACCEPT_RESOLUTION) >= MIN_FILL:
            accepted.append((a, b))
    return accepted


def render_class(
    a: np.ndarray, b: np.ndarray, count: int, resolution: int, seed: list[int]
) -> np.ndarray:
    """``count`` RGB instances [count, R, R, 3] uint8 of the system (a, b), seeded by ``seed``."""
    rng = np.random.default_rng(seed)
    centre, half = _frame(_chaos_game(a[None], b[None], rng)[:, 0])  # the canonical frame
    # Per-instance parameter noise, kept contractive.
    ai = _contract(a[None] + rng.normal(0.0, _PARAM_NOISE, (count, *a.shape)))
    bi = b[None] + rng.normal(0.0, _PARAM_NOISE, (count, *b.shape))
    x, y = (_chaos_game(ai, bi, rng) - centre[:, :, None]) / half  # [count, P] each
    # Rotation, scale and shift per instance.
    theta = rng.uniform(-_MAX_ROTATION, _MAX_ROTATION, (count, 1))
    scale = rng.uniform(*_SCALE_RANGE, (count, 1))
    shift = rng.uniform(-_MAX_SHIFT, _MAX_SHIFT, (2, count, 1))
    cos, sin = np.cos(theta) * scale, np.sin(theta) * scale
    q = np.stack([cos * x - sin * y + shift[0], sin * x + cos * y + shift[1]])
    # Colour: a random bright RGB per instance.
    colour = rng.uniform(0.2, 1.0, (count, 3))
    colour = np.round(colour / colour.max(-1, keepdims=True) * 255).astype(np.uint8)
    col, row, ok = _to_pixels(q, resolution)
    inst = np.broadcast_to(np.arange(count)[:, None], ok.shape)
    images = np.zeros((count, resolution, resolution, 3), np.uint8)
    images[inst[ok], row[ok], col[ok]] = colour[inst[ok]]
    return images


# ------------------------------------------------------------------------------------------------
# The TFDS builder.


@dataclasses.dataclass
class FractalsConfig(tfds.core.BuilderConfig):
    num_classes: int = 30
    class_offset: int = 0
    train_per_class: int = 250
    test_per_class: int = 50
    resolution: int = 32
    system_seed: int = 0


def make_config(
    num_classes: int = 30,
    class_offset: int = 0,
    train_per_class: int = 250,
    test_per_class: int = 50,
    resolution: int = 32,
    system_seed: int = 0,
) -> FractalsConfig:
    """A config whose name encodes every parameter, so each setting gets its own directory."""
    name = (
        f"c{num_classes}_o{class_offset}_tr{train_per_class}_te{test_per_class}"
        f"_r{resolution}_s{system_seed}"
    )
    return FractalsConfig(
        name=name,
        description=f"FractalDB-style IFS classes ({name})",
        num_classes=int(num_classes),
        class_offset=int(class_offset),
        train_per_class=int(train_per_class),
        test_per_class=int(test_per_class),
        resolution=int(resolution),
        system_seed=int(system_seed),
    )


class Fractals(PackagedBuilder):
    """Procedural IFS fractals, one class per system (see the module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [make_config()]

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        return self.make_info(
            image_shape=(c.resolution, c.resolution, 3),
            num_classes=c.num_classes,
            description=__doc__,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        c = self.builder_config
        ifs = systems(c.system_seed, c.class_offset + c.num_classes)[c.class_offset :]
        return {
            "train": self._generate_examples(ifs, "train", c.train_per_class),
            "test": self._generate_examples(ifs, "test", c.test_per_class),
        }

    def _generate_examples(self, ifs, split: str, per_class: int):
        c = self.builder_config
        for label, (a, b) in enumerate(ifs):
            # Instances depend on (seed, global class index, split) only: disjoint train/test and
            # the same images for a class whatever window of classes a config takes.
            seed = [c.system_seed, c.class_offset + label, _SPLIT_IDS[split]]
            images = render_class(a, b, per_class, c.resolution, seed)
            for i, image in enumerate(images):
                yield f"{label:05d}_{i:06d}", {"image": image, "label": label}


def config_for(**params) -> FractalsConfig | str:
    """What to pass as ``Fractals(config=...)`` for ``make_config(**params)``."""
    config = make_config(**params)
    # tfds refuses a config object that is equal to, but not the same object as, a predefined one.
    predefined = {c.name for c in Fractals.BUILDER_CONFIGS}
    return config.name if config.name in predefined else config
