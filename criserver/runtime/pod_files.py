"""The files every pod's containers share, whatever runs them: /etc/hostname, /etc/hosts and
/etc/resolv.conf (kubelet's DNS config, or the node's). Pure text; backends write it where their
containers can bind it."""

from __future__ import annotations

from pathlib import Path

from criserver.api.runtime.v1 import api_pb2 as cri

HOST_RESOLV_CONF = Path("/etc/resolv.conf")


def pod_hostname(config: cri.PodSandboxConfig) -> str:
    """The pod's host name: kubelet's, or (a pod with no name of its own) its metadata name."""
    return config.hostname or config.metadata.name[:63]


def resolv_conf(dns: cri.DNSConfig, host_file: Path = HOST_RESOLV_CONF) -> str:
    """The pod's resolv.conf: kubelet's DNS config, or the host's file when it gives none (as
    containerd does). Reads the host's file when needed: call it off the event loop."""
    if not (dns.servers or dns.searches or dns.options):
        try:
            return host_file.read_text()
        except OSError:
            return ""
    lines = [f"nameserver {server}" for server in dns.servers]
    if dns.searches:
        lines.append("search " + " ".join(dns.searches))
    if dns.options:
        lines.append("options " + " ".join(dns.options))
    return "".join(f"{line}\n" for line in lines)


def hosts(hostname: str, ips: list[str] | tuple[str, ...]) -> str:
    """/etc/hosts: localhost, then the pod's name on each of its addresses (127.0.1.1 without
    one, as Debian names a host)."""
    text = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    if hostname:
        for ip in ips or ["127.0.1.1"]:
            text += f"{ip}\t{hostname}\n"
    return text
