"""Receive: the DICOM SCP (C-ECHO, C-STORE into the durable spool)."""

from service.scp.server import StorageSCP, StoreHandler, build_ae

__all__ = ["StorageSCP", "StoreHandler", "build_ae"]
