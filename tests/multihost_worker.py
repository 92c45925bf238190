"""One process of the two-process (2 hosts x 4 CPU devices) RL-update test.

    python tests/multihost_worker.py PROCESS_ID PORT OUT.npz FSDP          # the update
    python tests/multihost_worker.py PROCESS_ID PORT OUT.npz loop          # the host loop

Update: the same two updates as test_rl_step._run on a mesh spanning both processes
(gloo collectives over 127.0.0.1), each process feeding only its own half of every
batch (its `local_rows`); process 0 writes the final params and metrics to OUT.npz.
Loop: test_rl_loop.run (sampling, rewards, updates) on the same two-process mesh, stopped
after 2 of 3 steps and resumed from its checkpoint; process 0 writes the final params
(the metrics are in OUT's folder, run/metrics.jsonl, written by process 0 alone).
"""

import os
import sys

pid, port, out, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)

import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_rl_step as t  # noqa: E402

from rubrax.rl.state import TrainState  # noqa: E402
from rubrax.rl.step import Trainer  # noqa: E402
from rubrax.sharding import local_rows, make_mesh  # noqa: E402

assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
if mode == "loop":
    # Stopped after 2 of 3 steps (checkpoint in a directory both processes share), then
    # resumed from it: orbax multi-process save/restore + the pre-sampled batch.
    import test_rl_loop
    from rubrax.rl.toy import TargetWordReward

    class Counting(TargetWordReward):
        scored = 0

        def __call__(self, prompts, completions, **columns):
            Counting.scored += len(completions)
            return super().__call__(prompts, completions, **columns)

    run_dir = os.path.join(os.path.dirname(out), "run")
    kw = dict(mesh=make_mesh(), rl=test_rl_loop.RLConfig(group_size=test_rl_loop.G, kl_coef=0.05), out_dir=run_dir,
              checkpoint_every=1, overlap="one_step_off_policy", reward=Counting(target="yes"))
    first = test_rl_loop.run(3, stop_after=2, **kw)
    resumed = test_rl_loop.run(3, **kw)
    assert [h["step"] for h in resumed.history] == [2], resumed.history
    # each host scored only the rows it feeds (4 prompts x G per step, half each), 3 steps
    assert Counting.scored == 3 * 4 * test_rl_loop.G // 2, Counting.scored
    params = multihost_utils.process_allgather(resumed.state.params, tiled=True)
    if pid == 0:
        np.savez(out, **{f"p{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(params))})
    multihost_utils.sync_global_devices("done")
    sys.exit(0)
fsdp = mode == "1"
tx = optax.adam(1e-2)
mesh = make_mesh()  # all 8 devices, both processes
# committed to a local device, as loaded or unstacked params are (plain device_put
# cannot place those on a mesh spanning other processes)
local = jax.local_devices()[0]
state = TrainState.create(jax.device_put(t.make_params(), local), tx, seed=3)
ref = jax.device_put(t.make_params(1), local)
trainer = Trainer(t.PPO_CFG, t.bigram_logits, tx, state, ref, mesh=mesh, fsdp=fsdp)
state, ref = trainer.place_state(state), trainer.place_ref(ref)
half = t.B // 2
for s in range(2):
    batch = t.make_rollouts(seed=s)
    rows = local_rows(mesh, t.B)
    assert rows == slice(pid * half, (pid + 1) * half)
    local = jax.tree.map(lambda x: np.asarray(x)[rows], batch)
    state, metrics = trainer(state, local, ref)
params = multihost_utils.process_allgather(state.params, tiled=True)
metrics = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in metrics.items()}
if pid == 0:
    np.savez(out, w=np.asarray(params["w"]), step=int(multihost_utils.process_allgather(state.step, tiled=True)),
             **{f"m_{k}": v for k, v in metrics.items()})
multihost_utils.sync_global_devices("done")
