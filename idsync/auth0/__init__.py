"""Auth0's side of idsync: the Management API client and recovery of failed deliveries."""
