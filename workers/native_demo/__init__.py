"""Demo native extension for Minions and the worker service that wraps it.

Importing this package must stay harmless: the parent process imports ``native_demo.service`` to
read handler annotations, so nothing here may load ``native_demo._native``.
"""
