"""Segment: each user's newest state as an ``identify`` (plus a ``track`` on deprovisioning).

``settings``: what a Segment destination reads from its ``<NAME>_*`` variables
(``Config`` for the registry); ``payload``: the messages sent for one user;
``adapter``: how they are batched and sent (``SegmentDestination``, and
``build`` for the registry). This module imports none of them, so that
reading settings never loads the adapter.
"""
