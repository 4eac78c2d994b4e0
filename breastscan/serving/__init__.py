"""Serving: the request engine, the model store import, the gRPC server, clients and the web UI."""
