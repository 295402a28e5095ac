"""labsupport: the support library of *Efficient LLM Architectures, built from scratch*.

The notebooks build each mechanism in the open; this package holds what the
chapters share (tasks, the pluggable tiny model, the trainer, benchmarking,
widgets, the exercise checkers) and the reference solutions.

Modules are imported on demand, e.g. ``from labsupport.lm.tasks import make_mqar``.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
