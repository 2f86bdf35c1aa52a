import os

import pytest


# Each test process builds datasets into its own cache, never the user's.
@pytest.fixture(scope="session", autouse=True)
def _data_dir(tmp_path_factory):
    if "TLX_DATA_DIR" not in os.environ:
        os.environ["TLX_DATA_DIR"] = str(tmp_path_factory.mktemp("tlx_data"))
    yield
