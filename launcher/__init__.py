"""tgi-trtllm launcher: starts the shard world under mpiexec and the router, supervises both.

It imports neither `router` nor `shard`: it talks to them only as processes (command lines, gRPC
Health, HTTP /health).
"""
