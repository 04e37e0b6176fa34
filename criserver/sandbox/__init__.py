"""Pod sandboxes: the QEMU micro-VM, its guest assets and the channel to the guest agent."""
