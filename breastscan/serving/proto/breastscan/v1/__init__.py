"""Protocol buffer package ``breastscan.v1``: the first version of the gRPC API (generated code)."""
