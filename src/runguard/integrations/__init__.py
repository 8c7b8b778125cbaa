"""Optional integrations with other tools; each is imported only when its tool is in use."""
