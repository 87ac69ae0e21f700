"""Braze: user profiles kept in step through ``/users/track`` attributes, keyed by the Auth0 id.

``settings``: what a Braze destination reads from its ``<NAME>_*`` variables
(``Config`` for the registry); ``client``: one HTTP call to the REST API and what
its answer means; ``adapter``: how a batch of users becomes calls
(``BrazeDestination``, and ``build`` for the registry). This module imports none
of them, so that reading settings never loads the adapter.
"""
