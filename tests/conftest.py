import os

# Tests run on CPU in float32; a host-platform device count lets sharding tests build meshes.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
