"""The VM layer both VM users share: CRI pods (backends/microvm) and IRI machines (machine/).

QEMU processes found again by their pidfiles (process, vm), their command lines (qemu), QMP
control and hotplug (vm), the accelerator probe (accel), guest assets (assets), taps (tap),
templates of booted guests (template), KSM (ksm) and the host's view of it all (host).
"""
