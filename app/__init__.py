"""Graft's HTTP service: routes, request schemas and the services behind them."""

from core import __version__

__all__ = ["__version__"]
