"""The `mergebot` command line: one entry point over engine, localhub, bot and space."""

__version__ = "0.1.0"
