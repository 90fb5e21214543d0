"""Golden numbers: computing them from a model and data, and comparing two sets."""
