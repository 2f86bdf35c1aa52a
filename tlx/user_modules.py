"""`--import=MODULE` of `tlx.main` and `tlx.sweep`: the user's own modules, imported before the
config is read, so what they register (a strategy with `tlx.strategies.register`, ...) is known
by name. Sweeps import them again in every worker process and Ray task (`prepare`).

A module is a dotted name found on sys.path (the current directory first, as `python -m` puts
it there) or a path to a .py file; the flag repeats or takes a comma list.
"""

import importlib
import importlib.util
import os
import sys

_IMPORTED: list[str] = []  # by `import_all` in this process, in order: what workers import


def parse(values) -> tuple[str, ...]:
    """The modules of one or more `--import` values ('a,b', 'c.py'), in order, without repeats;
    .py paths made absolute (a worker may start elsewhere)."""
    out = []
    for value in values:
        for name in (v.strip() for v in value.split(",")):
            if not name:
                continue
            name = os.path.abspath(name) if name.endswith(".py") else name
            if name not in out:
                out.append(name)
    return tuple(out)


def import_all(names) -> None:
    """Imports each of `names` (see `parse`) once per process. A module that is not found, or a
    file with a syntax error, is a ValueError of one line naming it; any other error in the
    module's own code propagates with its traceback (the user's code, to debug)."""
    for name in names:
        try:
            if name.endswith(".py"):
                _import_file(name)
            else:
                importlib.import_module(name)
        except ModuleNotFoundError as e:
            ours = not name.endswith(".py") and (e.name == name or name.startswith(f"{e.name}."))
            if not ours:
                raise  # the module imports something missing: its own traceback says what
            raise ValueError(
                f"--import={name}: no module {name!r} on the path ({os.getcwd()} first); run "
                "from its directory, add that to PYTHONPATH, or pass the file (--import=PATH.py)"
            ) from None
        except SyntaxError as e:
            raise ValueError(
                f"--import={name}: {e.filename}:{e.lineno}: syntax error: {e.msg}"
            ) from None
        if name not in _IMPORTED:
            _IMPORTED.append(name)


def imported() -> tuple[str, ...]:
    """The modules `import_all` imported in this process: a sweep's workers import them too."""
    return tuple(_IMPORTED)


def _import_file(path: str) -> None:
    if not os.path.isfile(path):
        raise ValueError(f"--import={path}: no such file")
    module = os.path.splitext(os.path.basename(path))[0]
    if module in sys.modules and getattr(sys.modules[module], "__file__", "") == path:
        return
    spec = importlib.util.spec_from_file_location(module, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[module] = mod  # so that pickled references to it resolve, as for an import
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[module]
        raise
