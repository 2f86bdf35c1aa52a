"""The command line: `python -m tlx.main --config=configs/FILE.py[:ARGS] --workdir=DIR`."""

from absl import app, flags, logging
from ml_collections import config_flags

from tlx import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (and :args).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; re-running resumes.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
    summary = train.run(_CONFIG.value, _WORKDIR.value)
    print({k: v for k, v in summary.items() if k.endswith("accuracy") or k == "wall_s"})


if __name__ == "__main__":
    app.run(main)
