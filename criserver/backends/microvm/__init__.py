"""The micro-VM backend: each pod a QEMU micro-VM (criserver.vm), its containers run by
the guest agent (vmagent) over the agent channel."""
