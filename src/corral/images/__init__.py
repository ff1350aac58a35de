"""Templates from images: OCI registry pulls, a digest-keyed layer store, build steps, and the other sources
(directories, tarballs, debootstrap, the host template).

Sits between the core and the runtimes: it produces tuples of read-only layer directories
(:class:`~corral.runtimes.base.HostLayers`) that the runtimes stack under a per-sandbox writable layer. It
never starts a sandbox itself: build steps run through a :class:`~corral.images.build.StepRunner` that the
core passes in.

- :mod:`.registry`: pull with skopeo into a shared OCI layout (the blob cache); typed errors.
- :mod:`.layers`: the layer store; every layer unpacked once, atomically.
- :mod:`._extract`: safe tar unpacking (escapes, devices, OCI whiteouts → overlayfs whiteouts).
- :mod:`.rootfs`: the host ``base`` template, directories, tarballs, debootstrap.
- :mod:`.build`: source + steps → layers + sandbox defaults, with progress events.
"""
