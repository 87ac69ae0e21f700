"""Salesforce CRM: one Contact (or Lead) per Auth0 user, keyed by an External ID field.

``settings``: what a Salesforce destination reads from its ``<NAME>_*`` variables;
``client``: the OAuth client-credentials token and the REST calls, with typed
errors; ``adapter``: how users become records (``SalesforceDestination``, and
``build`` for the registry). This module imports none of them, so that reading
settings never loads the adapter.
"""
