# The devices aloft's QEMU is built with (configure --without-default-devices --with-devices-x86_64=aloft):
# the microvm board (which selects its serial port, interrupt controllers, RTC, PIT and virtio-mmio
# transports) and the virtio devices `aloft-vm` puts on the command line (crates/vm/src/argv.rs).
# A device missing here makes QEMU refuse the command line ("'virtio-…-device' is not a valid
# device model name"): the VM tests catch it.
CONFIG_MICROVM=y
CONFIG_VIRTIO_MMIO=y
CONFIG_VIRTIO_BLK=y
CONFIG_VIRTIO_NET=y
CONFIG_VIRTIO_SERIAL=y
CONFIG_VIRTIO_BALLOON=y
