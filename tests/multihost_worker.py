"""One process of a 2-process run on localhost (see test_parallel.py and the README's multi-host notes).

    python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT

Every process starts JAX's distributed runtime with CPU collectives (gloo), builds the same tiny model
from the same seed, shards it over a data=2 x model=2 mesh spanning both processes' devices, generates,
and process 0 prints the tokens as JSON.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

process_id, num_processes, port = (int(a) for a in sys.argv[1:4])
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", num_processes=num_processes, process_id=process_id)

import jaxdecode as jd  # noqa: E402

from tiny import PROMPTS_FOR_MESH, tiny_model  # noqa: E402

mesh = jd.make_mesh(data=2, model=2)
model = jd.shard(tiny_model(), mesh)
out = jd.generate(model, PROMPTS_FOR_MESH, max_new_tokens=10, stop_ids=())
if process_id == 0:
    print(json.dumps({"devices": jax.device_count(), "tokens": out.tokens}))
