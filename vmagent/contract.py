"""The host<->guest contract of the pod guest: the names the daemon (criserver.backends.microvm)
and the agent (vmagent) must agree on, in the one module both import. The guest's /init
(guest/init.sh) reads the kernel command line words listed here too: keep it in step.

Constants only: the agent imports this before its first answer.
"""

from __future__ import annotations

# Kernel command line: `criserver.<key>=<value>` words; /init reads bus, transport, modules,
# pr_order and probe; the agent reads the keys of vmagent.settings.
CMDLINE_PREFIX = "criserver."

# The agent's port: a virtio-serial port of this name, or this vsock port.
AGENT_PORT_NAME = "criserver.agent"
AGENT_VSOCK_PORT = 1024

# Where the agent keeps the pod's files (hosts, resolv.conf, hostname, shm) that containers
# bind-mount, and mounts what the host shares.
RUN_DIR = "/run/criserver"
SHARED_DIR = f"{RUN_DIR}/shared"  # the SHARED_TAG share: the pod's volumes
IMAGE_VOLUMES_DIR = f"{RUN_DIR}/imagevolumes"  # image volumes, bound per container

# virtio-9p mount tags of the two host directories a pod guest sees.
IMAGES_TAG = "criserver.images"
SHARED_TAG = "criserver.shared"
