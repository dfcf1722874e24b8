"""Ray Tune sweeps over the DCGAN config (`python -m tuning.sweep`)."""
