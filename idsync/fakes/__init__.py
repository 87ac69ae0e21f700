"""Fakes of the external systems idsync talks to: real HTTP servers on loopback, for tests."""
