import os
import shutil
import tempfile

import pytest

# One JAX compilation cache for the session, never the user's (~/.cache/tlx/jax): this process and
# every process it starts (tlx.main, tlx.sweep and its workers, notebook kernels) read and write
# it, so a step compiled once (say the uninterrupted run of a kill-and-resume test) is loaded, not
# compiled again, by the processes that repeat it. Set here, at import, before any test module
# imports JAX (which reads JAX_* at import). tlx.sweep.enable_compilation_cache reads
# TLX_JAX_CACHE, JAX itself JAX_COMPILATION_CACHE_DIR. A cache the caller names is kept.
_OWN_CACHE = None
_CACHE = os.environ.get("TLX_JAX_CACHE") or os.environ.get("JAX_COMPILATION_CACHE_DIR")
if not _CACHE:
    _CACHE = _OWN_CACHE = tempfile.mkdtemp(prefix="tlx-test-jax-cache-")
os.environ["TLX_JAX_CACHE"] = os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
# As tlx.sweep does: every compiled program is kept (the tiny steps here compile in under the
# default 1 s on a quiet machine, and still cost seconds each).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


# Each test process builds datasets into its own cache, never the user's.
@pytest.fixture(scope="session", autouse=True)
def _data_dir(tmp_path_factory):
    if "TLX_DATA_DIR" not in os.environ:
        os.environ["TLX_DATA_DIR"] = str(tmp_path_factory.mktemp("tlx_data"))
    yield
