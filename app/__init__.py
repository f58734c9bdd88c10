"""Graft: teach a trained image classifier new labels, and prove it kept the old ones."""

__version__ = "0.1.0"
