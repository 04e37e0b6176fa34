"""The IRI MachineRuntime: whole virtual machines on the VM layer (criserver/vm) pods use too.

RPCs write durable desired state; a reconciler drives QEMU towards it (design:
docs/design/machine-runtime.md).
"""
