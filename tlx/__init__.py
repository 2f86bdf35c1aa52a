"""tlx: transfer learning in JAX/Flax.

Pre-train a backbone on a source dataset, then fine-tune it on a target with part of it frozen.
"""
