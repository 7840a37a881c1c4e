"""The server's core: models, specs, inits and tensor operations in torch terms.

Nothing under core/ imports grpc; it raises the exceptions of `paramhub.common.errors`, which the
servicer maps to status codes.
"""
