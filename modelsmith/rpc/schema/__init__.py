"""msgspec Structs of every RPC method's params and results, one module per namespace.

Clients import these to decode and print results; nothing here imports the domain.
"""
