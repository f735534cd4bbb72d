"""Data stage: real-format ingest to Parquet, and candidate pools for annotation."""

from utilrag.data.ingest import IngestError, ingest
from utilrag.data.pools import run_pools
from utilrag.data.registry import DatasetError

__all__ = ["ingest", "run_pools", "IngestError", "DatasetError"]
