"""What a micro-VM pod's container specs may carry (`oci_spec.SpecPolicy`): the VM is the pod, so
nothing of the node is shared with it, and the guest kernel has no LSM to enforce labels with.
"""

from __future__ import annotations

from criserver.runtime.oci_spec import SpecPolicy

POLICY = SpecPolicy(
    node_namespaces_refused={
        # The one hostNetwork refusal of the backend: run_sandbox checks the pod's options with
        # it, create_container (through oci_spec) each container's.
        "network": "hostNetwork pods cannot run in a micro-VM: the VM has its own network stack",
        "pid": "a micro-VM pod cannot share the host's namespaces",
        "ipc": "a micro-VM pod cannot share the host's namespaces",
    },
    devices_refused="devices cannot be passed into a micro-VM pod",
    apparmor_dropped="no apparmor in the guest",
    selinux_dropped="no selinux in the guest",
    # The guest's mounts cannot reach the host: it sees the host path through a share.
    bidirectional_refused="a micro-VM's mounts cannot propagate to the host; run the pod with "
                          "the runc handler",
    # runc runs in the guest, without systemd, and the agent puts each container's cgroup under
    # its own parent (vmagent/ocispec.py): the node's cgroup driver and the pod's cgroup parent
    # are the host's business, about the VM's QEMU process.
    cgroup_driver="cgroupfs",
    pod_cgroup_parent=False,
)
