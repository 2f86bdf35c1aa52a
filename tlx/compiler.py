"""The XLA compiler options tlx compiles its steps with, per platform.

On CPU, jaxlib 0.10 hands every convolution to YNNPACK (`__ynn_fusion`). For a convolution's
kernel gradient XLA emits a convolution whose window is the whole image, which YNNPACK runs at
4-30 GFLOP/s on ResNet-18's 32x32x64 layers against 100-150 for XLA's Eigen convolution
(0.7-1.2 s against 50 ms for one 64-image kernel gradient); its forward and input-gradient
convolutions are also slower there (experiments/bench_conv.py prints both). tlx therefore keeps
YNNPACK for what it does well, matrix products and reductions (XLA's default set without
convolutions), and leaves convolutions to Eigen:

    xla_cpu_experimental_ynn_fusion_type = LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,
                                           LIBRARY_FUSION_TYPE_REDUCE

Every step tlx compiles passes `options()` (`jit` below, `Runner`'s train and eval
steps, feature extraction). It is None, XLA's defaults, on other platforms, when XLA_FLAGS names
the option itself (the user's choice wins), or when this jaxlib does not know it (the option is
experimental; a jaxlib without it compiles with its defaults after one warning). Code that calls
`jax.jit` itself gets the same speed with `jax.jit(f, compiler_options=tlx.compiler.options())`
or `XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=...` set before JAX starts.
"""

import functools
import os
import warnings

import jax

CPU_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": (
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
    ),
}


def options(backend: str | None = None) -> dict | None:
    """The options for `jax.jit(..., compiler_options=...)` on `backend` (default: JAX's)."""
    return _options(backend or jax.default_backend(), os.environ.get("XLA_FLAGS", ""))


@functools.cache
def _options(backend: str, xla_flags: str) -> dict | None:
    if backend != "cpu":
        return None
    wanted = {k: v for k, v in CPU_OPTIONS.items() if k not in xla_flags}
    if not wanted:
        return None
    try:  # an option this jaxlib does not know fails at compile: ask once, with a tiny program
        jax.jit(lambda x: x + 1, compiler_options=wanted).lower(1.0).compile()
    except Exception as e:  # noqa: BLE001 - XLA raises its own runtime error type
        warnings.warn(
            f"tlx.compiler: this jaxlib refuses {sorted(wanted)} ({str(e).splitlines()[0]}); "
            "compiling with XLA's defaults (CPU convolutions may be slower)",
            stacklevel=3,
        )
        return None
    return wanted


def jit(fn, **kwargs):
    """`jax.jit` with `options()`."""
    return jax.jit(fn, compiler_options=options(), **kwargs)


def pmap(fn, **kwargs):
    """`jax.pmap` with `options()` (pmap takes none: each new argument signature is
    lowered and compiled with them on its first call).

    Over several processes it is plain `jax.pmap`, XLA's defaults: there pmap's ahead-of-time
    executable is compiled for the global arguments and refuses the process-local ones a
    pmap'd step is called with (jaxlib 0.10.2). The default mode, jit, has the options everywhere.
    """
    mapped = jax.pmap(fn, **kwargs)
    opts = options()
    if opts is None or jax.process_count() > 1:
        return mapped
    cache = {}

    @functools.wraps(fn)
    def call(*args):
        leaves, tree = jax.tree.flatten(args)
        key = (tree, tuple((getattr(x, "shape", None), getattr(x, "dtype", None)) for x in leaves))
        if key not in cache:
            cache[key] = mapped.lower(*args).compile(compiler_options=opts)
        return cache[key](*args)

    return call
