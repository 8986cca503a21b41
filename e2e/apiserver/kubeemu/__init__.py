"""An in-memory Kubernetes API server emulator built on top of kmock (see ../README.md)."""
