"""jit over a 2-device mesh and pmap give the same training trajectory (BatchNorm synced)."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from tlx import freeze, models, optim, train
    from tlx.parallel import Runner
    assert jax.device_count() == 2, jax.devices()

    def trajectory(mode, strategy):
        runner = Runner(mode)
        spec = freeze.default_config(); spec.strategy = strategy
        model = models.build("resnet_tiny", 4, axis_name=runner.axis_name)
        x = jax.random.normal(jax.random.key(1), (3, 8, 16, 16, 3))
        params0 = model.init(jax.random.key(0), x[0, :1])
        mask = freeze.frozen_mask(spec, params0["params"])
        model = model.clone(frozen_bn=freeze.frozen_stages(spec, params0["params"]))
        labels = optim.group_labels(params0["params"], mask, ["^head/"])
        # SGD: Adam divides by sqrt(v), which turns summation-order noise (1e-9) in a near-zero
        # gradient into a visible step (seen: 3.5e-5 after 3 steps); SGD compares the machinery.
        cfg = optim.default_config(); cfg.name, cfg.lr, cfg.head_lr = "sgd", 0.05, 0.1
        tx, _ = optim.make(cfg, labels, 3)
        state = {"params": params0["params"], "batch_stats": params0["batch_stats"],
                 "opt_state": tx.init(params0["params"]), "step": jnp.int32(0)}
        step = runner.train_step(train.make_train_step(model, tx, labels,
                                                       axis_name=runner.axis_name))
        state = runner.put_state(state)
        losses = []
        for i in range(3):
            batch = {"image": np.asarray(x[i]), "label": np.arange(8, dtype=np.int32) % 4}
            state, m = step(state, runner.put_batch(batch))
            losses.append(runner.metrics(m)["loss"])
        return jax.device_get(runner.get_state(state)), losses

    for strategy in ["none", "freeze_early"]:
        a, la = trajectory("jit", strategy)
        b, lb = trajectory("pmap", strategy)
        leaves = lambda s: jax.tree.leaves((s["params"], s["batch_stats"]))
        diff = max(float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
                   for u, v in zip(leaves(a), leaves(b)))
        print(strategy, "max_abs_diff", diff, "losses", la, lb)
        assert diff < 1e-5, diff
        assert np.allclose(la, lb, atol=1e-5)
        assert not np.allclose(la[0], la[-1])
    print("OK")
""")


def test_jit_and_pmap_steps_give_the_same_params_on_two_devices():
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu"
    )
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "OK" in out.stdout
