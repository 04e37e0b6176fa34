from pathlib import Path

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.runtime import pod_files


def test_resolv_conf_from_kubelet_dns() -> None:
    dns = cri.DNSConfig(servers=["10.96.0.10"], searches=["default.svc", "svc"],
                        options=["ndots:5"])
    assert pod_files.resolv_conf(dns) == (
        "nameserver 10.96.0.10\nsearch default.svc svc\noptions ndots:5\n")


def test_resolv_conf_falls_back_to_the_hosts_file(tmp_path: Path) -> None:
    host = tmp_path / "resolv.conf"
    host.write_text("nameserver 192.0.2.1\n")
    assert pod_files.resolv_conf(cri.DNSConfig(), host) == "nameserver 192.0.2.1\n"
    assert pod_files.resolv_conf(cri.DNSConfig(), tmp_path / "missing") == ""


def test_hosts_names_the_pod_on_each_address() -> None:
    text = pod_files.hosts("web", ["10.1.0.5", "fd00::5"])
    assert text.splitlines()[-2:] == ["10.1.0.5\tweb", "fd00::5\tweb"]
    assert pod_files.hosts("web", []).splitlines()[-1] == "127.0.1.1\tweb"
    assert "localhost" in pod_files.hosts("", [])


def test_hostname_defaults_to_the_pod_name() -> None:
    config = cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(name="x" * 70))
    assert pod_files.pod_hostname(config) == "x" * 63
    config.hostname = "given"
    assert pod_files.pod_hostname(config) == "given"
