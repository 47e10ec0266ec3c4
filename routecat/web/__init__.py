"""The website: pages, charts, templates and static files (no script from elsewhere)."""
