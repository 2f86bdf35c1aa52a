"""bitfit (Ben Zaken et al. 2022, "BitFit"): only the biases train, with the norm layers' scales
and biases (LayerNorm, or BatchNorm's affine) and the new head; every kernel, embedding and
token is frozen. No new parameters."""

from tlx.strategies.base import Strategy, register

# Frozen: a leaf outside the head whose name is neither 'bias' nor 'scale'.
FROZEN = r"^(?!head/).*/(?!(?:bias|scale)$)[^/]+$"

BITFIT = register(
    Strategy(
        "bitfit",
        "only biases, norm scales/biases and the head train",
        frozen=lambda ctx: [FROZEN],
        tags=("peft",),
    )
)
