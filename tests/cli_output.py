"""What the CLI itself printed on stderr.

With the `aot` extra on a machine without a GPU, JAX's CUDA plugin loads a stub library whose C++ logger
prints a few lines before Python runs any of our code ("WARNING: All log messages before
absl::InitializeLog() ..." and "I0000 ... cudart_stub.cc:31] Could not find cuda drivers ..."). They are
not the CLI's; the one-line-error checks look at the rest.
"""

from __future__ import annotations

import re

_NATIVE_LOG = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\)|[IWEF]\d{4} \d\d:\d\d:\d\d)")


def stderr_lines(stderr: str) -> list[str]:
    return [line for line in stderr.strip().splitlines() if not _NATIVE_LOG.match(line)]
