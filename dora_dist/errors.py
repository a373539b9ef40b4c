"""Errors every layer may raise for the user's input; the CLI turns them into one-line messages and exit code 2.

A module of its own, below everything, so that a loader (models/) can report a bad setting as a config error
without importing the config layer above it.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot work, with a message naming the key."""
