"""Receive: the DICOM SCP (C-ECHO, C-STORE into the durable spool)."""

from service.scp.server import ReceivingStudies, StorageSCP, StoreHandler, build_ae

__all__ = ["ReceivingStudies", "StorageSCP", "StoreHandler", "build_ae"]
