"""vmagent: the agent that runs as PID 1 in every pod's micro-VM and serves the host's
criserver daemon over virtio-serial or vsock. It must import nothing from `criserver` and only
grpclib and protobuf from third parties (the guest carries nothing else).
"""

__version__ = "0.1.0"
