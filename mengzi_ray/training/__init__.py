"""Training: optimiser/schedule of the original recipe and the train loops."""
