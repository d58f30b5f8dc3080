"""Federated learning: the client-update wire format (DESIGN.md section 4), clients and the
FedAvg/FedAvgM server."""

from .codec import UpdateRejected, decode_update, encode_update
from .client import Client, ClientConfig
from .server import RoundResult, Server

__all__ = ["encode_update", "decode_update", "UpdateRejected", "Client", "ClientConfig",
           "Server", "RoundResult"]
