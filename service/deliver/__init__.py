"""Deliver: send results to PACS destinations."""

from service.deliver.record import record_store_attempt
from service.deliver.storescu import StoreOutcome, store_objects

__all__ = ["StoreOutcome", "record_store_attempt", "store_objects"]
