"""Checkpoints: exact save/restore, strict init_from into a new head, clear errors."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tlx import checkpoint, freeze, models


def variables(name="resnet_tiny", classes=10, seed=0, **kw):
    model = models.build(name, classes, **kw)
    v = model.init(jax.random.key(seed), jnp.zeros((1, 16, 16, 3)), train=False)
    return jax.tree.map(np.asarray, dict(v))


def flat(tree):
    return {freeze.path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def save_run(workdir, v, step=5):
    ck = checkpoint.Checkpointer(str(workdir))
    state = {
        "params": v["params"],
        "batch_stats": v["batch_stats"],
        "opt_state": {"mu": v["params"]},
        "step": np.int32(step),
    }
    ck.save(step, state, {"position": step})
    ck.wait()
    ck.close()
    return state


def test_save_and_restore_give_the_same_state(tmp_path):
    state = save_run(tmp_path, variables())
    ck = checkpoint.Checkpointer(str(tmp_path))
    assert ck.latest_step() == 5
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), state)
    restored, data_state = ck.restore(5, abstract)
    assert data_state == {"position": 5}
    a, b = flat(state), flat(restored)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_checkpoint_tree_is_readable_with_plain_orbax(tmp_path):
    save_run(tmp_path, variables())
    tree = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / "5" / "state")
    assert {"params", "batch_stats", "opt_state", "step"} <= set(tree)


def test_init_from_into_a_new_head_restores_backbone_exactly_and_reports_head(tmp_path):
    src = variables(classes=30, seed=1)
    save_run(tmp_path / "pretrain", src)
    target = variables(classes=10, seed=2)
    loaded = checkpoint.read_variables(str(tmp_path / "pretrain"))
    merged, report = checkpoint.merge(target, loaded, ["^head/"], "zeros", "pre")
    m, s = flat(merged), flat(src)
    for path in m:
        if path.startswith("params/head/"):
            assert np.array_equal(m[path], np.zeros_like(m[path])), path
        else:
            assert np.array_equal(m[path], s[path]), path
    assert report["reinitialised"] == ["params/head/bias", "params/head/kernel"]
    assert report["skipped"] == ["params/head/bias", "params/head/kernel"]
    assert len(report["loaded"]) == len(m) - 2


def test_init_reinit_init_keeps_the_models_initialiser():
    target = variables(classes=10, seed=2)
    merged, _ = checkpoint.merge(target, variables(classes=30), ["^head/"], "init")
    assert np.array_equal(merged["params"]["head"]["kernel"], target["params"]["head"]["kernel"])


def test_checkpoint_of_the_wrong_shape_is_an_error_naming_the_paths():
    target = variables("resnet_tiny", 10)
    source = variables("resnet18", 10, stem="cifar")
    with pytest.raises(checkpoint.InitError) as e:
        checkpoint.merge(target, source, ["^head/"])
    msg = str(e.value)
    assert "shape mismatch" in msg and "params/stem/conv1/kernel" in msg
    assert "in the checkpoint but not in the model" in msg and "stage4" in msg


def test_head_of_another_size_without_reinit_is_an_error():
    with pytest.raises(checkpoint.InitError, match=r"params/head/kernel: checkpoint \(64, 30\)"):
        checkpoint.merge(variables(classes=10), variables(classes=30), [])


def test_missing_checkpoint_says_what_to_give(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*workdir"):
        checkpoint.find_state_dir(str(tmp_path / "nope"))
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
        checkpoint.find_state_dir(str(tmp_path / "empty"))


def test_find_state_dir_accepts_workdir_checkpoints_and_step(tmp_path):
    save_run(tmp_path, variables(), step=3)
    save_run(tmp_path, variables(), step=7)
    want = str(tmp_path / "checkpoints" / "7" / "state")
    for p in [tmp_path, tmp_path / "checkpoints", tmp_path / "checkpoints" / "7"]:
        assert checkpoint.find_state_dir(str(p)) == want
    assert checkpoint.find_state_dir(str(tmp_path / "checkpoints" / "3")).endswith("3/state")


def test_write_report(tmp_path):
    checkpoint.write_report(str(tmp_path), {"loaded": ["a"]})
    assert json.loads((tmp_path / "load_report.json").read_text()) == {"loaded": ["a"]}


def test_reading_a_runs_variables_prints_no_orbax_metadata_warning(tmp_path, caplog):
    save_run(tmp_path, variables())
    with caplog.at_level(logging.WARNING):
        checkpoint.read_variables(str(tmp_path))
    assert not [r for r in caplog.records if "Metadata file" in r.getMessage()]


def test_metrics_are_truncated_to_the_checkpoint_step_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1}, {"step": 2}, {"step": 2, "split": "val"}, {"step": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "lo')
    checkpoint.truncate_metrics(str(path), 2)
    assert [json.loads(x) for x in path.read_text().splitlines()] == lines[:3]
    checkpoint.truncate_metrics(str(path), 2, final_splits=("val",))  # killed after its last save
    assert [json.loads(x) for x in path.read_text().splitlines()] == lines[:2]


def test_a_changed_config_is_refused_naming_the_fields_unless_forced(tmp_path):
    old = {"seed": 0, "optim": {"lr": 0.1, "name": "sgd"}, "progress": True, "config_version": 2}
    (tmp_path / "config.json").write_text(json.dumps(old))
    new = {**old, "optim": {"lr": 0.2, "name": "sgd"}, "progress": False}  # progress: ignored
    assert checkpoint.check_resume(str(tmp_path), dict(old, progress=False), "ckpt") == ([], False)
    with pytest.raises(checkpoint.ResumeMismatch, match=r"resume ckpt: .*optim.lr: 0.1 -> 0.2"):
        checkpoint.check_resume(str(tmp_path), new, "ckpt")
    history, changed = checkpoint.check_resume(str(tmp_path), new, "ckpt", resume="force")
    assert changed and history[0]["changed"] == {"optim.lr": [0.1, 0.2]}
    assert checkpoint.check_resume(str(tmp_path), new, None) == ([], False)  # no state: start over


def _corrupt(step_dir, how):
    files = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != "tlx_sha256.json")
    target = max(files, key=lambda p: p.stat().st_size)  # the largest: array data
    if how == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size, one byte changed
        target.write_bytes(bytes(data))
    elif how == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    else:  # delete the metadata file
        (step_dir / "state" / "_METADATA").unlink()


@pytest.mark.parametrize("how", ["flip", "truncate", "metadata"])
def test_a_corrupt_latest_step_falls_back_to_the_newest_good_one(tmp_path, how, capsys):
    ck = checkpoint.Checkpointer(str(tmp_path), max_to_keep=3)
    v = variables()
    for step in (1, 2, 3):
        ck.save(step, {"params": v["params"], "step": np.int32(step)}, {"position": step})
    ck.close()
    _corrupt(tmp_path / "checkpoints" / "3", how)
    ck = checkpoint.Checkpointer(str(tmp_path), max_to_keep=3)
    assert ck.good_step() == 2
    assert "checkpoints/3 is corrupt" in capsys.readouterr().err
    assert (tmp_path / "checkpoints" / "3.corrupt").is_dir() and ck.latest_step() == 2
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                            {"params": v["params"], "step": np.int32(0)})  # fmt: skip
    restored, data = ck.restore(2, abstract)
    assert data == {"position": 2}
    ck.close()


@pytest.mark.parametrize("how", ["flip", "metadata"])
def test_init_from_a_run_with_a_corrupt_step_reads_the_newest_good_one(tmp_path, how, capsys):
    save_run(tmp_path, variables(), step=3)
    save_run(tmp_path, variables(seed=1), step=7)
    _corrupt(tmp_path / "checkpoints" / "7", how)
    assert checkpoint.find_state_dir(str(tmp_path)).endswith("checkpoints/3/state")
    assert "checkpoints/7 is corrupt" in capsys.readouterr().err
    with pytest.raises(checkpoint.InitError, match="checkpoints/7 is corrupt"):
        checkpoint.read_variables(str(tmp_path / "checkpoints" / "7"))  # named: no fallback
    got = flat(checkpoint.read_variables(str(tmp_path)))
    want = flat(variables())
    assert all(np.array_equal(got[k], want[k]) for k in want)
