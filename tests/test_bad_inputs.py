# ruff: noqa: E501 - the table of cases reads best one case a line
"""Bad inputs to `python -m tlx.main`, as a new user gives them: each exits non-zero with one line
that names the problem, and leaves an existing run directory as it was.

The cases run `tlx.main.main(argv)` in this process (its return value is the exit status); a few
run as real subprocesses to check that status end to end.
"""

import hashlib
import os
import re
import subprocess
import sys
import time

import pytest

from tlx import config as tlx_config
from tlx import main as tlx_main
from tlx import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = "configs/pretrain.py:steps=4,batch_size=16,image_size=16"
FT = "configs/finetune.py:target=digits,steps=4,batch_size=16,image_size=16"
BASE = [
    "--config.data.fractals.num_classes=4",
    "--config.data.fractals.train_per_class=20",
    "--config.data.fractals.test_per_class=5",
    "--config.progress=false",
    "--config.tensorboard=false",
    "--config.checkpoint_every=2",
]

# (name, config spec, extra args, exit status, regex the one 'tlx.main:' line must match)
CASES = [
    ("classes on a non-fractal target", FT + ",classes=5", [], 1, r"classes=5 applies to fractals only, not to 'digits'"),
    ("negative steps", SPEC.replace("steps=4", "steps=-5"), [], 1, r"total_steps=-5: use a value >= 1"),
    ("zero steps", SPEC, ["--config.total_steps=0"], 1, r"total_steps=0"),
    ("zero batch size", SPEC, ["--config.batch_size=0"], 1, r"batch_size=0: use a value >= 1"),
    ("negative eval batch", SPEC, ["--config.eval_batch_size=-1"], 1, r"eval_batch_size=-1"),
    ("zero log_every", SPEC, ["--config.log_every=0"], 1, r"log_every=0"),
    ("zero max_to_keep", SPEC, ["--config.max_to_keep=0"], 1, r"max_to_keep=0"),
    ("negative checkpoint_every", SPEC, ["--config.checkpoint_every=-1"], 1, r"checkpoint_every=-1"),
    ("negative eval_every", SPEC, ["--config.eval_every=-3"], 1, r"eval_every=-3"),
    ("negative seed", SPEC, ["--config.seed=-1"], 1, r"seed=-1"),
    ("fractional steps", SPEC, ["--config.total_steps=1.5"], 1, r"total_steps='1.5': not an int"),
    ("val_fraction 0", SPEC, ["--config.data.val_fraction=0"], 1, r"data.val_fraction=0.0"),
    ("val_fraction 1.5", SPEC, ["--config.data.val_fraction=1.5"], 1, r"data.val_fraction=1.5"),
    ("lr nan", SPEC, ["--config.optim.lr=nan"], 1, r"optim.lr=nan: not finite"),
    ("lr inf", SPEC, ["--config.optim.lr=inf"], 1, r"optim.lr=inf: not finite"),
    ("lr negative", SPEC.replace("steps=4", "steps=4,lr=-0.01"), [], 1, r"optim.lr=-0.01"),
    ("lr not a number", SPEC, ["--config.optim.lr=fast"], 1, r"optim.lr='fast': not a float"),
    ("head_lr inf", SPEC, ["--config.optim.head_lr=inf"], 1, r"optim.head_lr=inf"),
    ("weight decay negative", SPEC, ["--config.optim.weight_decay=-5"], 1, r"optim.weight_decay=-5"),
    ("momentum 1.5", SPEC, ["--config.optim.momentum=1.5"], 1, r"optim.momentum=1.5: use a value < 1"),
    ("label smoothing 1", SPEC, ["--config.optim.label_smoothing=1"], 1, r"optim.label_smoothing"),
    ("negative warmup", SPEC, ["--config.optim.warmup_steps=-3"], 1, r"optim.warmup_steps=-3"),
    ("negative clip", SPEC, ["--config.optim.clip_norm=-1"], 1, r"optim.clip_norm=-1"),
    ("unknown optimizer", SPEC, ["--config.optim.name=adam"], 1, r"optim.name='adam': use one of \['adamw', 'sgd'\]"),
    ("unknown schedule", SPEC, ["--config.optim.schedule=cosine"], 1, r"optim.schedule='cosine'"),
    ("unknown parallel", SPEC, ["--config.parallel=pmapp"], 1, r"parallel='pmapp'"),
    ("unknown bn mode", SPEC, ["--config.freeze.bn=freeze"], 1, r"freeze.bn='freeze'"),
    ("bad freeze regex", SPEC, ["--config.freeze.patterns=[\"stage1(\"]"], 1, r"freeze.patterns=.*'stage1\(' is not a valid regex"),
    ("bad reinit regex", SPEC, ["--config.init_reinit=^head/("], 1, r"init_reinit=.*'\^head/\(' is not a valid regex"),
    ("bad lr_mults regex", SPEC, ['--config.optim.lr_mults=[["stage1(", 0.1]]'], 1, r"optim.lr_mults=.*not a valid regex"),
    ("bad lr_mults value", SPEC, ['--config.optim.lr_mults=[["stage1", -1]]'], 1, r"optim.lr_mults=.*use a value >= 0"),
    ("bool spelled maybe", SPEC, ["--config.eval_train=maybe"], 1, r"eval_train='maybe': use true or false"),
    ("bool spelled 2", SPEC, ["--config.feature_cache=2"], 1, r"feature_cache='2': use true or false"),
    ("short-arg bool", FT.replace("steps=4", "steps=4,augment=maybe"), [], 1, r"augment='maybe': use true or false"),
    ("short-arg int", SPEC.replace("steps=4", "steps=ten"), [], 1, r"steps='ten': not an int"),
    ("short arg without =", SPEC + ",steps", [], 1, r"config arg 'steps' is not KEY=VALUE"),
    ("unknown short arg", FT + ",stratgy=none", [], 1, r"unknown config arg 'stratgy'.*strategy"),
    ("unknown nested key", SPEC, ["--config.optim.foo=1"], 1, r"unknown config key 'optim.foo': optim has no 'foo' \(its keys: .*lr"),
    ("misspelt key", SPEC, ["--config.optim.learning_rate=0.1"], 1, r"'optim.learning_rate'.*head_lr"),
    ("unknown top key", SPEC, ["--config.nosuch=1"], 1, r"unknown config key 'nosuch': the config has no 'nosuch'"),
    ("a block as a value", SPEC, ["--config.optim=1"], 1, r"config key 'optim' is a block"),
    ("unknown backbone", SPEC, ["--config.model.name=resnet7"], 1, r"model.name='resnet7': use one of"),
    ("unknown stem", SPEC, ["--config.model.stem=big"], 1, r"model.stem='big'"),
    ("2 channels", SPEC, ["--config.data.channels=2"], 1, r"data.channels=2: use one of \[1, 3\]"),
    ("unknown normalize", SPEC, ["--config.data.normalize=imagenett"], 1, r"data.normalize='imagenett'"),
    ("image size 0", SPEC, ["--config.data.image_size=0"], 1, r"data.image_size=0"),
    ("in_memory maybe", SPEC, ["--config.data.in_memory=maybe"], 1, r"data.in_memory='maybe'"),
    ("negative examples", SPEC, ["--config.data.examples_per_class=-2"], 1, r"data.examples_per_class=-2"),
    ("inception scale reversed", SPEC, ["--config.data.augment.inception_scale=[0.5, 0.1]"], 1, r"inception_scale=.*low > high"),
    ("fewshot 0 shots", SPEC, ["--config.fewshot.shots=[0]"], 1, r"fewshot.shots=\[0\]"),
    ("unknown strategy", FT + ",strategy=nosuch", [], 1, r"unknown freeze strategy 'nosuch'"),
    ("lp_fraction 1.5", FT + ",strategy=lp_ft,lp_fraction=1.5", [], 1, r"lp_fraction=1.5: use 0 < f < 1"),
    ("missing config file", "configs/nope.py", [], 1, r"config file 'configs/nope.py' not found"),
    ("longer run in a finished dir", SPEC, ["--config.total_steps=10"], 1, r"cannot resume .*checkpoints/4: .*total_steps: 4 -> 10.*--resume=force"),
    ("other lr in a finished dir", SPEC.replace("steps=4", "steps=4,lr=1e-3"), [], 1, r"cannot resume .*optim.lr: 0.002 -> 0.001"),
    ("other bn mode in a finished dir", SPEC, ["--config.freeze.bn=train"], 1, r"cannot resume .*freeze.bn: 'frozen' -> 'train'"),
    ("empty workdir", SPEC, ["--workdir="], 2, r"--workdir is empty"),
    ("unknown resume mode", SPEC, ["--resume=maybe"], 2, r"--resume='maybe': use auto or force"),
    ("unknown flag", SPEC, ["--wrkdir=x"], 2, r"unknown flag --wrkdir"),
    ("positional argument", SPEC, ["extra"], 2, r"unexpected argument 'extra'"),
]  # fmt: skip


def _snapshot(workdir) -> dict:
    """Every file of a run directory but its lock, by content hash."""
    out = {}
    for top, _, files in os.walk(workdir):
        for name in files:
            if name != ".lock":
                path = os.path.join(top, name)
                out[os.path.relpath(path, workdir)] = hashlib.sha256(
                    open(path, "rb").read()
                ).hexdigest()
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("finished"))
    assert tlx_main.main([f"--config={SPEC}", f"--workdir={workdir}", *BASE]) == 0
    return workdir


def _main(argv, capsys):
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        status = tlx_main.main(argv)
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    return status, [line for line in err.splitlines() if line.startswith("tlx.main:")], err


def test_there_are_at_least_40_cases():
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(
    ("name", "spec", "extra", "status", "pattern"), CASES, ids=[c[0] for c in CASES]
)
def test_a_bad_input_exits_with_one_line_naming_it_and_changes_nothing(
    finished, capsys, name, spec, extra, status, pattern
):
    before = _snapshot(finished)
    argv = [f"--config={spec}", f"--workdir={finished}", *BASE, *extra]
    if any(a.startswith("--workdir=") for a in extra):
        argv.remove(f"--workdir={finished}")
    got, lines, err = _main(argv, capsys)
    assert got == status, err
    assert len(lines) == 1, err
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in err
    assert _snapshot(finished) == before


def test_a_second_process_on_a_workdir_is_refused_naming_the_holder(finished, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from tlx import rundir\n"
         "with rundir.lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)",
         finished],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _snapshot(finished)
        got, lines, err = _main([f"--config={SPEC}", f"--workdir={finished}", *BASE], capsys)
        assert got == 1, err
        assert len(lines) == 1 and f"in use by pid {holder.pid} on host" in lines[0], err
        assert _snapshot(finished) == before
    finally:
        holder.kill()
        holder.wait()


def test_an_lr_that_diverges_exits_non_zero_naming_the_step(tmp_path, capsys):
    extra = ["--config.optim.name=sgd", "--config.optim.schedule=constant",
             "--config.optim.warmup_steps=0", "--config.optim.lr=1e6",
             "--config.total_steps=12", "--config.checkpoint_every=1"]  # fmt: skip
    got, lines, err = _main([f"--config={SPEC}", f"--workdir={tmp_path}", *BASE, *extra], capsys)
    assert got == 1, err
    assert len(lines) == 1 and "NonFiniteError: step " in lines[0], err
    assert "last finite checkpoint" in lines[0]


def test_init_from_a_missing_directory_is_one_line_and_marks_the_run_failed(tmp_path, capsys):
    spec = FT + f",init_from={tmp_path / 'nope'}"
    got, lines, err = _main([f"--config={spec}", f"--workdir={tmp_path / 'run'}", *BASE], capsys)
    assert got == 1 and len(lines) == 1 and "does not exist" in lines[0], err
    failed = (tmp_path / "run" / train.FAILED).read_text()
    assert '"status": "failed"' in failed


def test_list_fields_are_overridable_from_the_command_line():
    c = tlx_config.load(
        os.path.join(ROOT, SPEC),
        **{"freeze.patterns": "^stem/,^stage1/", "fewshot.shots": "[1, 5]"},
    )
    assert list(c.freeze.patterns) == ["^stem/", "^stage1/"] and list(c.fewshot.shots) == [1, 5]


def test_the_exit_status_reaches_the_shell():
    """Two cases as real processes: a bad value (1) and a usage error (2)."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    for extra, status in ((["--config.optim.lr=nan"], 1), (["--workdir="], 2)):
        t = time.time()
        out = subprocess.run(
            [sys.executable, "-m", "tlx.main", f"--config={SPEC}", "--workdir=/tmp/x", *extra],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert out.returncode == status, out.stderr
        assert "Traceback" not in out.stderr and time.time() - t < 120
