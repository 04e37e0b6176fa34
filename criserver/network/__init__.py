"""Pod networking on the host: network namespaces and CNI, one manager per daemon. Backends
that run VMs carry the CNI interface into the guest with criserver.vm.tap."""
