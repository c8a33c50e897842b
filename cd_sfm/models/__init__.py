"""ContextDesc inference: the Keras models, their weights, the runner and the int8 runtime (no tooling)."""

PRECISIONS = ("fp32", "bf16", "int8", "auto")  # ContextDesc inference (runner.resolve_precision)
