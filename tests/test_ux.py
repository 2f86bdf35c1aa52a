"""What a new user meets (issue 27): one's own images without TensorFlow, one's own strategies
from the command line and in a sweep's worker processes, one line instead of a traceback, and
nothing silent."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tlx import advise, models, predict, sweep
from tlx import main as tlx_main
from tlx.data import folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = ["--config.progress=false", "--config.tensorboard=false"]
TINY = "steps=2,batch_size=8,image_size=8"


def _one_line(err: str, prefix: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


def _image_folder(root, classes=("cat", "dog"), per_class=10, test_per_class=0):
    """Small RGB images, a colour per class, as JPEG and PNG files of several sizes."""
    rng = np.random.default_rng(0)
    for split, n in (("", per_class), ("test", test_per_class)):
        for label, name in enumerate(classes):
            if not n:
                continue
            d = os.path.join(root, split, name)
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                x = rng.integers(0, 60, (12 + i, 14, 3)).astype(np.uint8)
                x[..., label] += 180
                Image.fromarray(x).save(os.path.join(d, f"{i}.{'jpg' if i % 2 else 'png'}"))
    return str(root)


# -- one's own images ------------------------------------------------------------------------------
def test_an_image_folder_is_built_once_then_trains_as_target_name(tmp_path, capsys):
    src = _image_folder(tmp_path / "photos")
    assert folder.main([f"--src={src}", "--name=ux_photos"]) == 0
    assert "use target=ux_photos" in capsys.readouterr().out
    status = tlx_main.main(
        [f"--config=configs/finetune.py:target=ux_photos,{TINY}", f"--workdir={tmp_path / 'ft'}"]
        + QUIET
    )
    assert status == 0, capsys.readouterr().err
    data = json.load(open(tmp_path / "ft" / "summary.json"))["dataset"]
    # 20 images: a stratified 20% test carve (2 per class), then the val carve from train.
    assert data["num_classes"] == 2
    assert data["num_examples"] == {"train": 14, "val": 2, "test": 4}


def test_an_image_folder_keeps_its_own_test_folder_as_the_test_split(tmp_path):
    src = _image_folder(tmp_path / "photos", per_class=6, test_per_class=3)
    path = folder.build(src, "ux_with_test", str(tmp_path / "data"))
    info = json.load(open(os.path.join(path, "dataset_info.json")))
    sizes = {s["name"]: sum(int(n) for n in s["shardLengths"]) for s in info["splits"]}
    assert sizes == {"train": 12, "test": 6}


def test_an_image_folder_with_a_file_pillow_cannot_read_is_one_line_naming_it(tmp_path, capsys):
    src = _image_folder(tmp_path / "photos", per_class=3)
    (tmp_path / "photos" / "dog" / "broken.jpg").write_text("not a jpeg")
    assert folder.main([f"--src={src}", "--name=ux_broken"]) == 1
    line = _one_line(capsys.readouterr().err, "tlx.data.folder:")
    assert "broken.jpg: not an image Pillow can read" in line


def test_a_directory_as_target_names_the_command_that_builds_it(tmp_path, capsys):
    src = _image_folder(tmp_path / "photos", per_class=3)
    argv = [f"--config=configs/finetune.py:target={src},{TINY}", f"--workdir={tmp_path / 'r'}"]
    assert tlx_main.main(argv + QUIET) == 1
    line = _one_line(capsys.readouterr().err, "tlx.main:")
    assert f"python -m tlx.data.folder --src={src} --name=photos" in line


# -- one's own strategies --------------------------------------------------------------------------
STRATEGY_MODULE = """
from tlx import strategies

strategies.register(
    strategies.Strategy("{name}", "the head alone trains (a user's strategy)",
                        frozen=lambda ctx: [r"^(?!head/)"])
)
"""


def _user_module(tmp_path, name: str) -> str:
    (tmp_path / f"{name}_mod.py").write_text(STRATEGY_MODULE.format(name=name))
    return f"{name}_mod"


def test_import_makes_a_strategy_in_a_users_module_reachable_from_tlx_main(
    tmp_path, monkeypatch, capsys
):
    module = _user_module(tmp_path, "ux_head_only")
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = [
        f"--config=configs/finetune.py:target=digits,strategy=ux_head_only,{TINY}",
        f"--workdir={tmp_path / 'run'}",
        f"--import={module}",
    ]
    assert tlx_main.main(argv + QUIET) == 0, capsys.readouterr().err
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    assert summary["params_trainable"] < summary["params_frozen"]


def test_import_of_a_module_that_is_not_there_is_one_line(tmp_path, capsys):
    argv = [f"--config=configs/finetune.py:{TINY}", f"--workdir={tmp_path}", "--import=ux_nowhere"]
    assert tlx_main.main(argv + QUIET) == 1
    assert "--import=ux_nowhere: no module 'ux_nowhere'" in _one_line(
        capsys.readouterr().err, "tlx.main:"
    )


def test_import_reaches_the_worker_processes_of_a_sweep(tmp_path):
    module = _user_module(tmp_path, "ux_sweep_head")
    study = tmp_path / "study.py"
    study.write_text(
        textwrap.dedent(f"""
        def get_sweep(arg=None):
            return [{{
                "config": "{ROOT}/configs/finetune.py:target=digits,strategy=ux_sweep_head,"
                "{TINY}",
                "axes": {{"strategy": "ux_sweep_head"}},
            }}]
        """)
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, str(tmp_path)])}
    cmd = [sys.executable, "-m", "tlx.sweep", f"--config={study}", f"--workdir={tmp_path / 's'}"]
    cmd += ["--parallel=2", "--no_report", f"--import={module}"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = open(tmp_path / "s" / "results.csv").read()
    assert "ux_sweep_head" in rows


def test_a_sweep_passes_its_imports_to_the_worker_processes(tmp_path, monkeypatch):
    made = {}

    def make(launcher, parallel, prepare, **ray_options):
        made["prepare"] = prepare
        raise RuntimeError("stop here")

    monkeypatch.setattr(sweep.launchers, "make", make)
    monkeypatch.setattr(sweep.user_modules, "_IMPORTED", ["json", "ux_user_module"])
    with pytest.raises(RuntimeError, match="stop here"):
        sweep.run_sweep([{"config": "configs/finetune.py:steps=1", "axes": {}}], str(tmp_path))
    assert made["prepare"].args == (("json", "ux_user_module"),)


# -- one line, not a traceback ---------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_tlx_main_help_prints_the_usage_and_exits_0(flag, capsys):
    assert tlx_main.main([flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m tlx.main --config=")
    assert "--import=MODULE" in out


def test_predict_on_a_missing_file_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        predict.main(["--backbone=mobilenet_v2", str(tmp_path / "nope.png")])
    assert e.value.code == 1
    assert "nope.png: no such file" in _one_line(capsys.readouterr().err, "tlx.predict:")


def test_predict_on_a_file_that_is_not_an_image_is_one_line(tmp_path, capsys):
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(SystemExit) as e:
        predict.main(["--backbone=mobilenet_v2", str(tmp_path / "notes.png")])
    assert e.value.code == 1
    line = _one_line(capsys.readouterr().err, "tlx.predict:")
    assert "notes.png: not an image Pillow can read" in line


@pytest.mark.parametrize(
    "backbone, says",
    [("resnet18", "no imagenet weights for 'resnet18'"), ("vit_ti4", "no pretrained source")],
)
def test_predict_with_a_backbone_without_weights_is_one_line(
    backbone, says, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("TLX_CACHE_DIR", str(tmp_path / "cache"))
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    with pytest.raises(SystemExit) as e:
        predict.main([f"--backbone={backbone}", str(image)])
    assert e.value.code == 1
    assert says in _one_line(capsys.readouterr().err, "tlx.predict:")


def test_lora_on_a_cnn_says_it_targets_a_vits_dense_kernels(tmp_path, capsys):
    argv = [f"--config=configs/finetune.py:strategy=lora,{TINY}", f"--workdir={tmp_path}"]
    assert tlx_main.main(argv + QUIET) == 1
    line = _one_line(capsys.readouterr().err, "tlx.main:")
    assert "targets the Dense kernels of a ViT's attention" in line
    assert "strategy.lora.targets" in line


# -- nothing silent --------------------------------------------------------------------------------
def test_a_vit_refuses_an_image_size_its_patch_does_not_divide():
    model = models.build("vit_ti4", 10)
    with pytest.raises(
        ValueError, match=r"10x10 is not a multiple of the ViT's patch size 4.*8 or 12"
    ):
        model.init(jax.random.key(0), jnp.zeros((1, 10, 10, 3)))


def _advice():
    rows = [
        {
            "stage": s,
            "dim": 16,
            "probe": {"accuracy": a, "std": 0.01, "se": 0.01, "l2": 1.0},
            "logme": {"value": 0.1, "std": 0.01},
        }
        for s, a in (
            ("stem", 0.5),
            ("stage1", 0.8),
            ("stage2", 0.81),
            ("stage3", 0.7),
            ("stage4", 0.6),
        )
    ]
    sim = advise.similarity(rows, 10)
    return {
        "backbone": "resnet_tiny",
        "init_from": "runs/pre",
        "target": "mnist5k",
        "num_classes": 10,
        "train_examples": 100,
        "examples_per_class": {"mean": 10.0, "min": 10},
        "folds": 3,
        "stages": rows,
        "similarity": sim,
        "size": "small",
        "rule_of_thumb": {"similarity": sim["label"], "size": "small", "strategy": "freeze_early"},
        "recommendation": advise.recommend(sim, 10, 4),
        "cache": {"hit": False},
        "wall_s": {"load": 3.0, "features": 22.0, "probes": 115.0, "total": 140.0},
    }


def test_advise_prints_its_recommendation_as_the_cli_takes_it():
    table = advise.format_table(_advice())
    assert "tlx recommends: strategy=freeze_stages,stages=2 " in table
    assert "seed's table (different, small): strategy=freeze_early" in table


def test_advise_wall_line_adds_up_load_features_and_probes():
    wall = advise.format_table(_advice()).splitlines()[-1]
    assert wall.startswith("wall: 140.0 s (load 3.0 s, features 22.0 s")
    assert "probes 115.0 s" in wall


@pytest.mark.parametrize(
    "module, sentence",
    [
        ("tlx.advise", "from one pass of\nthe frozen backbone over the target's training split"),
        ("tlx.sweep", "into\nDIR/results.csv, then the report (tables and plots) of `tlx.report`."),
    ],
)
def test_help_texts_are_not_cut_mid_sentence(module, sentence, capsys):
    with pytest.raises(SystemExit):
        {"tlx.advise": advise.main, "tlx.sweep": sweep.main}[module](["--help"])
    assert sentence in capsys.readouterr().out
