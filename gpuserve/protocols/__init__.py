"""Codecs: request bodies to instances and rows to response bodies, for `/predict`, KServe v1
and the Open Inference Protocol, and the one table from an error's kind to each protocol's
status. Pure functions of bytes, specs and rows: no FastAPI, no gRPC."""
