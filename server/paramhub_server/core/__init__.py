"""The server's core: models, specs, inits and tensor operations in torch terms.

Nothing under core/ imports grpc; it raises the exceptions of `paramhub.errors`, which the
servicer maps to status codes.
"""
