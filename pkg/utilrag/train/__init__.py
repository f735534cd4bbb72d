"""The train stage (lands with its own issue)."""
