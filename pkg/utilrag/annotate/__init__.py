"""The annotate stage (lands with its own issue)."""
