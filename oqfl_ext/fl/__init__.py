"""Federated learning: the client-update wire format (docs/DESIGN.md section 4), clients, the
FedAvg/FedAvgM server, the compressed downlink (:mod:`oqfl_ext.fl.downlink`), checkpoints, run metrics, one experiment's configuration and construction
(:mod:`oqfl_ext.fl.experiment`) and the ``oqfl-fl`` command line (:mod:`oqfl_ext.fl.cli`)."""

from .codec import UpdateRejected, decode_model, decode_update, encode_model, encode_update
from .client import Client, ClientConfig, ClientTimeout, derive_seed
from .downlink import DeltaBroadcast, HeldModel
from .server import (DOWNLINK_CODECS, DeliveryUnconfirmed, Dropped, NotDelivered, RemoteClient,
                     RoundResult, RoundStart, Server, downlink_codec)
from .checkpoint import (CheckpointError, CheckpointMismatch, load_checkpoint, resume,
                         save_checkpoint)
from .metrics import load_run, plot_runs, save_run

__all__ = ["encode_update", "decode_update", "encode_model", "decode_model", "UpdateRejected",
           "Client", "ClientConfig",
           "ClientTimeout", "derive_seed", "Server", "RoundResult", "DOWNLINK_CODECS",
           "NotDelivered", "DeliveryUnconfirmed", "Dropped", "RemoteClient", "RoundStart",
           "downlink_codec", "DeltaBroadcast", "HeldModel", "save_checkpoint", "load_checkpoint", "resume", "CheckpointError",
           "CheckpointMismatch", "save_run", "load_run", "plot_runs"]
