"""The daemon: start-up (runtime), scheduling, signals and the loop that drives every stage."""
