"""Graft's Python client and command line. ``from graft.client import Client``."""
