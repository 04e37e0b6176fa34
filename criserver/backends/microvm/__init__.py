"""The micro-VM backend: each pod a QEMU micro-VM (criserver.sandbox), its containers run by
the guest agent (vmagent) over the agent channel."""
