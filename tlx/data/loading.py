"""`tlx.data.load`: the dataset a data config describes, on the input path it needs: in memory
(`tlx.data.pipeline`) or streamed (`tlx.data.stream`), as ``data.in_memory`` decides."""

import ml_collections

from tlx.data import pipeline, stream


def load(cfg: ml_collections.ConfigDict):
    """The dataset that ``cfg`` (``config.data``, see `tlx.data.default_config`) describes: a
    `pipeline.Dataset` (in memory) or a `stream.StreamingDataset`, with one interface."""
    pipeline.check_config(cfg)
    data_dir = pipeline.resolve_data_dir(cfg)
    params = pipeline.builder_params(cfg)
    info = pipeline.open_builder(cfg.name, data_dir, params).info
    in_memory, reason = stream.choose_path(cfg, info)
    if not in_memory:
        return stream.StreamingDataset.open(cfg, data_dir, params, reason)
    return pipeline.load_in_memory(cfg, data_dir, params, reason)


def fingerprint(cfg: ml_collections.ConfigDict) -> str:
    """The fingerprint of the dataset ``cfg`` describes, as built (`pipeline.fingerprint`: what
    its `describe()['fingerprint']` is), without loading it; builds it if it is not built yet."""
    return pipeline.fingerprint(
        cfg.name, pipeline.resolve_data_dir(cfg), pipeline.builder_params(cfg)
    )
