"""Gru's orchestration runtime; import the public names from :mod:`minions`."""
