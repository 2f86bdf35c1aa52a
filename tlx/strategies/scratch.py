"""scratch: the baseline, the same run from a random initialisation (init_from is ignored),
everything trained at one learning rate (1e-3 unless the config's lr/head_lr say otherwise)."""

from tlx.strategies.base import Strategy, register

SCRATCH = register(
    Strategy(
        "scratch",
        "random init, everything trains (the baseline)",
        config_defaults={"optim.lr": 1e-3, "optim.head_lr": 1e-3},
        from_scratch=True,
        tags=("baseline",),
    )
)
