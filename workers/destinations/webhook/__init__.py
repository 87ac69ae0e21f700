"""A company's own service: signed Standard Webhooks messages, one per user.

``settings``: what a webhook destination reads from its ``<NAME>_*`` variables
(``Config`` for the registry, ``WebhookSettings`` for the adapter, ``missing``);
``adapter``: how it sends (``WebhookDestination``, and ``build`` for the
registry). ``docs/webhook-payload.schema.json`` describes the messages. This
module imports neither, so that reading settings never loads the adapter.
"""
