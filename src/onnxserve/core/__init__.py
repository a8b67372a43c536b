"""The serving core: types, datatypes, runtime, repository, registry and the inference service.

Nothing in this package knows about HTTP, gRPC or any wire format.
"""
