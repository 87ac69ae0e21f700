"""idsync: keep business systems in step with a company's identity provider."""
