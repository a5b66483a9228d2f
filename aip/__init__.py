"""aip: structured channel pruning with adversarial knowledge distillation."""

__version__ = "0.1.0"
