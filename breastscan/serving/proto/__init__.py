"""The gRPC API's protocol definition and its generated Python code.

``breastscan/v1/breastscan.proto`` is the source; ``breastscan/v1/breastscan_pb2*.py(i)``
are generated from it by :mod:`breastscan.serving.proto.generate` and committed. Import
them as ``breastscan.serving.proto.breastscan.v1.breastscan_pb2`` (messages) and
``..._pb2_grpc`` (service stub and servicer base).
"""
