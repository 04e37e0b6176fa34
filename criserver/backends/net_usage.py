"""A pod's network counters (its netns's interfaces, as /proc/<pid>/net/dev lists them and the
guest agent reports them: vmagent.metrics.interfaces) as CRI stats and metric samples, for every
backend."""

from __future__ import annotations

from collections.abc import Sequence

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.runtime.metric_sample import InterfaceSample
from vmagent.api import agent_pb2 as pb

DEFAULT_INTERFACE = "eth0"  # the CNI interface of a pod's netns (and of a pod's guest)


def network_usage(interfaces: Sequence[pb.InterfaceStats], now: int
                  ) -> cri.NetworkUsage | None:
    """eth0 is the default interface, as containerd's; the others are listed apart, not
    counted twice. None without interfaces: no usage, not zero usage."""
    def usage(i: pb.InterfaceStats) -> cri.NetworkInterfaceUsage:
        return cri.NetworkInterfaceUsage(
            name=i.name, rx_bytes=cri.UInt64Value(value=i.rx_bytes),
            rx_errors=cri.UInt64Value(value=i.rx_errors),
            tx_bytes=cri.UInt64Value(value=i.tx_bytes),
            tx_errors=cri.UInt64Value(value=i.tx_errors))

    if not interfaces:
        return None
    default = next((i for i in interfaces if i.name == DEFAULT_INTERFACE), interfaces[0])
    return cri.NetworkUsage(
        timestamp=now, default_interface=usage(default),
        interfaces=[usage(i) for i in interfaces if i.name != default.name])


def interface_samples(interfaces: Sequence[pb.InterfaceStats]) -> list[InterfaceSample]:
    return [InterfaceSample(
        name=i.name, rx_bytes=i.rx_bytes, rx_packets=i.rx_packets, rx_errors=i.rx_errors,
        rx_dropped=i.rx_dropped, tx_bytes=i.tx_bytes, tx_packets=i.tx_packets,
        tx_errors=i.tx_errors, tx_dropped=i.tx_dropped) for i in interfaces]
