"""What a run ran on and with: the code's commit (and whether the tree was dirty), package
versions, the platform (CPU model, accelerator, XLA flags, the compiler options tlx passes).
Recorded in summary.json, outside the config, so it never enters a run's hash: two machines
agree on what to run, not on its bits.
"""

import functools
import importlib.metadata
import os
import platform
import subprocess

from tlx import compiler

PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "numpy",
    "grain",
    "ml-collections",
)


def collect() -> dict:
    import jax

    devices = jax.devices()
    return {
        **_code(),
        "packages": _versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "backend": jax.default_backend(),
        "devices": f"{len(devices)} x {devices[0].device_kind}" if devices else "",
        "process_count": jax.process_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "compiler_options": compiler.options() or {},
    }


@functools.cache
def _code() -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args):
        out = subprocess.run(
            ["git", "-C", root, *args], capture_output=True, text=True, timeout=10, check=False
        )
        return out.stdout.strip() if out.returncode == 0 else None

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        commit = dirty = None
    return {"commit": commit, "dirty": None if dirty is None else bool(dirty)}


@functools.cache
def _versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


@functools.cache
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
