"""Tapping ReLU pre-activations while data streams through a model."""
