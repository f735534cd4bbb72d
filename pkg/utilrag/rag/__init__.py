"""The rag stage (lands with its own issue)."""
