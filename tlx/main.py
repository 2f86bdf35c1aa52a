"""The command line: `python -m tlx.main --config=configs/FILE.py[:ARGS] --workdir=DIR`.

  --config.KEY=VALUE   any field of the resolved config, typed like it (lists as JSON or a,b,c)
  --resume=force       continue the run in DIR under a changed config (recorded in config.json)
  --import=MODULE      import a module of yours first (repeatable, or a,b; a name on the path
                       or a file.py), e.g. one that registers a strategy: strategy=NAME finds it

One run over several processes (hosts), with jax.distributed (`tlx.distributed`):
  --coordinator=HOST:PORT --num_processes=N --process_id=I   on every process (0 serves HOST:PORT)
  --coordinator=auto   SLURM, Open MPI or a TPU slice: jax detects the processes itself
  --dist_timeout=S     seconds to wait for the coordinator and the other processes (300)

An error of the user's (a bad value, an unknown key, a busy or mismatched workdir, a diverged run)
is one line on stderr and exit status 1; a usage error exits 2.
"""

import sys

from tlx import user_modules

USAGE = (
    "usage: python -m tlx.main --config=configs/FILE.py[:ARGS] --workdir=DIR "
    "[--config.KEY=VALUE ...] [--resume=auto|force] [--import=MODULE[,MODULE]] "
    "[--coordinator=HOST:PORT|auto --num_processes=N --process_id=I --dist_timeout=S]"
)
DIST_FLAGS = {"coordinator": str, "num_processes": int, "process_id": int, "dist_timeout": float}


def parse(argv: list[str]) -> tuple[str, str, dict, str, dict, tuple[str, ...]]:
    """(config spec, workdir, {dotted key: string value}, resume mode, distributed flags, modules
    to import) from the arguments."""
    spec = workdir = None
    overrides, resume, dist, imports = {}, "auto", {}, []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            raise HelpRequested
        if not arg.startswith("--"):
            raise UsageError(f"unexpected argument {arg!r}")
        name, sep, value = arg[2:].partition("=")
        if not sep:
            if not args:
                raise UsageError(f"--{name} needs a value")
            value = args.pop(0)
        if name == "config":
            spec = value
        elif name.startswith("config."):
            overrides[name.removeprefix("config.")] = value
        elif name == "workdir":
            workdir = value
        elif name == "resume":
            resume = value
        elif name == "import":
            imports.append(value)
        elif name in DIST_FLAGS:
            try:
                dist[name] = DIST_FLAGS[name](value)
            except ValueError:
                raise UsageError(f"--{name}={value!r} is not a number") from None
        else:
            raise UsageError(f"unknown flag --{name}")
    if spec is None or workdir is None:
        raise UsageError(f"--{'config' if spec is None else 'workdir'} is required")
    if not workdir.strip():
        raise UsageError("--workdir is empty: give the run directory")
    if resume not in ("auto", "force"):
        raise UsageError(f"--resume={resume!r}: use auto or force")
    if dist.get("dist_timeout", 1) <= 0:
        raise UsageError(f"--dist_timeout={dist['dist_timeout']}: give seconds > 0")
    return spec, workdir, overrides, resume, dist, user_modules.parse(imports)


class UsageError(Exception):
    pass


class HelpRequested(Exception):
    """-h or --help among the arguments: print the usage and the flags, exit 0."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        spec, workdir, overrides, resume, dist, imports = parse(argv)
    except HelpRequested:
        print(f"{USAGE}\n\n{__doc__.strip()}")
        return 0
    except UsageError as e:
        print(f"tlx.main: {e}\n{USAGE}", file=sys.stderr)
        return 2
    from absl import logging

    from tlx import config as tlx_config
    from tlx import distributed, rundir, train

    logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
    try:
        distributed.initialize(
            dist.get("coordinator"),
            dist.get("num_processes"),
            dist.get("process_id"),
            dist.get("dist_timeout", distributed.DEFAULT_TIMEOUT_S),
        )
        user_modules.import_all(imports)  # before the config: it may name their strategies
        config = tlx_config.load(spec, **overrides)
        summary = train.run(config, workdir, resume=resume)
    except (
        ValueError,  # bad config values and args, checkpoint.InitError, ResumeMismatch
        KeyError,  # unknown config keys
        FileNotFoundError,
        train.NonFiniteError,
        rundir.WorkdirLocked,
    ) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"tlx.main: {type(e).__name__}: {msg}", file=sys.stderr)
        return 1
    if distributed.is_main():
        print({k: v for k, v in summary.items() if k.endswith("accuracy") or k == "wall_s"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
