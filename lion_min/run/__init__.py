"""What makes a real run safe around the method: config and flags, recipes, run folders, resume,
the data cache, memory estimates, the loop's bookkeeping."""
