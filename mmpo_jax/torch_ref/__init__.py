"""PyTorch reference implementations, used by tests and `mmpo-jax compare`.

Needs the `torch` extra (`pip install -e '.[torch]'`).
"""
