"""The notifications app: recipients, preferences, templates, notifications and their
per-channel deliveries, and the API that creates and reads them."""
