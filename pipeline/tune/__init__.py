"""Stage tune: a Ray Tune sweep whose trials are Ray Train runs of the same loop."""
