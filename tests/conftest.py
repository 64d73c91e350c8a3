import atexit
import os
import shutil
import sys
import tempfile

# Eight virtual CPU devices for the mesh tests; must be set before JAX starts (nothing imports it earlier).
# Everything else runs on the first device as usual.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

# The tests run on the CPU. With the `aot` extra installed, JAX would otherwise also try to start the CUDA
# plugin and libtpu, find no hardware and say so at length; the compile-only TPU/CUDA devices of
# `jaxdecode.targets` need neither started (test_compile.py).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# In-process CLI tests turn on JAX's persistent compilation cache for their whole worker: keep it in a
# directory of this run, not the user's ~/.cache (whose entries from earlier runs include compile-only
# TPU executables that cannot be read back and warn).
if "JAXDECODE_CACHE_DIR" not in os.environ:
    os.environ["JAXDECODE_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxdecode-test-cache-")
    atexit.register(shutil.rmtree, os.environ["JAXDECODE_CACHE_DIR"], ignore_errors=True)

# Tests import helpers (hf_models.py) from this folder.
sys.path.insert(0, os.path.dirname(__file__))
