"""The demo task (two-digit addition), the experiments on it, and their runs."""
