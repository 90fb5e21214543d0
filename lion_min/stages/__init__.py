"""Each stage's run: checks, data, the run folder, then the method's loop."""
