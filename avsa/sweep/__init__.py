"""Ray Tune sweeps over config keys: the search space (`space`), the Tuner and its trials,
each one run through the same run driver as a single pretraining (`driver`), and the finished
sweep's table and plot (`report`)."""
