"""Components written the way the established Minions docs write them, for tests/test_upstream_*.

Each module is a start target: ``apps.upstream.one_minion`` holds one local Minion subclass,
``apps.upstream.named`` names its entry points with ``minion =``/``pipeline =``, and
``apps.upstream.two_minions`` holds two without naming one. Components report to the shared
:class:`apps.harness.Harness`, so tests wait on its queues instead of sleeping.
"""
