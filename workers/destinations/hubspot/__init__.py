"""HubSpot CRM: one contact per Auth0 user (``settings``: what it needs; ``adapter``: how)."""
