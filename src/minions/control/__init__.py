"""Talking to a running Gru: the local control endpoint behind ``minions status`` and friends.

Gru serves one ZeroMQ socket in a private (0700) runtime directory, so only its own uid (and
root) can connect. :mod:`.messages` is the protocol, :mod:`.endpoint` where the socket lives and
how a client finds it, :mod:`.server` the Gru side, :mod:`.client` the CLI side and
:mod:`.commands` the ``minions`` subcommands.
"""
