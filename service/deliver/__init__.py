"""Deliver: send results to PACS destinations."""

from service.deliver.storescu import StoreOutcome, store_objects

__all__ = ["StoreOutcome", "store_objects"]
