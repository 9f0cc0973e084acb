"""Subprocess body for tests/test_parallel.py (needs its own XLA_FLAGS / jax.distributed).

Modes:
  meshes  OUT.pkl             gradients and train steps on several meshes vs one device
  ckpt    WORKDIR OUT.json    save on (2,4), restore onto (8,1) and (1,1)
  dist    RANK PORT OUT.json  one of two jax.distributed processes; 3 train steps
  single  OUT.json            the same 3 steps in one process (reference for `dist`)
  loop    WORKDIR OUT.json    the real train loop on (2,4), resumed onto (8,1)
  pallas  OUT.pkl             attention=pallas per shard (shard_map) on meshes vs xla on one device
  bucket  RANK PORT WORKDIR OUT.pkl   one of two jax.distributed processes running the real train loop
                              on a gs:// workdir: stopped after the first checkpoint, then resumed from it
  bucket1 WORKDIR OUT.pkl     the same run in one process, straight (reference for `bucket`)
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import sys

import numpy as np
from conftest import DEMO, stop_at, tiny_config  # tests/ is sys.path[0]: this file runs as a script

# On top of TINY (and demo.yaml): 4 heads, ABBA adapters, linear guidance, a constant-ish lr.
EXTRA = [
    "model.n_heads=4",
    "model.vocab_size=128",
    "model.adapter=abba",
    "model.adapter_rank=2",
    "model.adapter_rank2=2",
    "model.guidance=linear",
    "train.lr=1e-2",
    "train.warmup_steps=0",
]


def dump(obj, path) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)


def cfg_for(mesh: tuple[int, int, int] = (-1, 1, 1)):
    d, f, t = mesh
    return tiny_config(*EXTRA, f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.tensor={t}", base=DEMO)


def batches(cfg, n, process_index=0, process_count=1):
    from asura.data.pipeline import build_eval_batches

    return build_eval_batches(cfg, n, process_index=process_index, process_count=process_count)


def run_steps(cfg, placement, local_batches, depths, built=None):
    import jax
    import jax.numpy as jnp

    from asura.train.state import init_state
    from asura.train.step import make_train_step

    built = built or init_state(cfg)
    state = placement.state(built.state)
    step = placement.jit_step(make_train_step(cfg, built.graphdef, built.rest, built.axes))
    losses = []
    for b, n in zip(local_batches, depths, strict=True):
        state, m = step(state, placement.batch(b), jnp.int32(n))
        losses.append(float(m["objective"]))
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), state["params"])
    return state, losses, params


def init_grads(cfg, placement, built, batch, n) -> dict[str, np.ndarray]:
    """Gradients at the initial params, before the optimiser (the step's own accumulated_grads)."""
    import jax
    import jax.numpy as jnp

    from asura.train.step import accumulated_grads

    params = placement.state(built.state)["params"]  # read only: run_steps may donate built.state later
    fn = placement.jit_eval(lambda p, b, n: accumulated_grads(cfg, built.graphdef, built.rest, p, b, n)[2])
    return flat(jax.device_get(fn(params, placement.batch(batch), jnp.int32(n))))


def flat(tree):
    import jax

    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


STEP_DEPTHS = [2, 1]


def record(cfg, placement, built, bs) -> tuple[dict, dict]:
    """(record, final state) of the gradients at init, then len(STEP_DEPTHS) train steps from init:
    per-step losses, final params and each step's lr. The test compares records with its own tolerances."""
    from asura.train.optim import lr_schedule

    r = {"grads": init_grads(cfg, placement, built, bs[0], STEP_DEPTHS[0])}
    state, r["losses"], params = run_steps(cfg, placement, bs, STEP_DEPTHS, built=built)
    r["params"] = flat(params)
    r["lr"] = [float(lr_schedule(cfg.train)(i)) for i in range(len(STEP_DEPTHS))]
    return r, state


def mode_meshes(out):
    """Gradients and train steps per mesh and on one device, returned whole (pickle), with shardings."""
    from asura.parallel.placement import MeshPlacement, Placement
    from asura.train.loop import FAST_COMPILE
    from asura.train.state import init_state

    cfg = cfg_for()
    bs = batches(cfg, 2)
    ref, _ = record(cfg, Placement(cfg, compiler_options=FAST_COMPILE), init_state(cfg), bs)
    results = {}
    for mesh in [(8, 1, 1), (2, 4, 1), (1, 8, 1), (2, 2, 2)]:
        cfg_m = cfg_for(mesh)
        built = init_state(cfg_m)
        r, state = record(cfg_m, MeshPlacement(cfg_m, built.axes, compiler_options=FAST_COMPILE), built, bs)
        r["specs"] = {
            k: str(x.sharding.spec)
            for k, x in flat_arrays(state["params"]).items()
            if hasattr(x, "sharding") and hasattr(x.sharding, "spec")
        }
        r["opt_specs"] = [str(x.sharding.spec) for x in flat_arrays(state["opt_state"]).values() if np.ndim(x) >= 2]
        results["x".join(map(str, mesh))] = r
    with open(out, "wb") as f:
        pickle.dump({"ref": ref, "meshes": results}, f)


def flat_arrays(tree):
    import jax

    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def mode_ckpt(workdir, out):
    import jax

    from asura.parallel.placement import MeshPlacement
    from asura.train.checkpoint import CheckpointStore
    from asura.train.state import abstract_state, init_state

    cfg = cfg_for((2, 4, 1))
    built = init_state(cfg)
    placement = MeshPlacement(cfg, built.axes)
    state, _, params = run_steps(cfg, placement, batches(cfg, 1), [2], built=built)
    store = CheckpointStore(workdir, keep=2, async_save=True)
    store.save(1, state, {"note": "test"}, {"step": 1})
    store.close()
    saved = flat(params)
    res = {}
    for mesh in [(8, 1, 1), (1, 1, 1)]:
        cfg_m = cfg_for(mesh)
        devices = jax.devices()[: int(np.prod(mesh))]
        from asura.parallel.mesh import make_mesh

        shapes = abstract_state(cfg_m)
        pl = MeshPlacement(cfg_m, shapes.axes, mesh=make_mesh(cfg_m.mesh, devices))
        target = pl.abstract(shapes.state)
        store = CheckpointStore(workdir, keep=2, async_save=False)
        step, restored, data_state, _ = store.restore_latest_valid(target)
        store.close()
        got = flat(jax.tree.map(np.asarray, restored["params"]))
        devs = {len(x.sharding.device_set) for x in jax.tree.leaves(restored["params"])}
        res["x".join(map(str, mesh))] = {
            "step": step,
            "data_state": data_state,
            "max_err": max(float(np.max(np.abs(got[k] - saved[k]))) for k in saved),
            "device_counts": sorted(devs),
        }
    dump(res, out)


def mode_dist(rank, port, out, levels="one"):
    """levels: one (a flat data mesh over both processes) | dcn (each process a DCN granule:
    mesh.dcn.data=2 over mesh.data=1 per process, the multi-slice layout on CPUs)."""
    rank = int(rank)
    os.environ.update(ASURA_COORDINATOR=f"127.0.0.1:{port}", ASURA_NUM_PROCESSES="2", ASURA_PROCESS_ID=str(rank))
    from asura.parallel.distributed import initialize

    initialize()
    import jax

    from asura.parallel.placement import MeshPlacement
    from asura.train.state import init_state

    cfg = cfg_for()
    if levels == "dcn":
        m = cfg.mesh
        cfg = cfg.replace(mesh=dataclasses.replace(m, data=1, dcn=dataclasses.replace(m.dcn, data=2)))
    # The same global batches as `single`, each process holding its half of the rows.
    half = cfg.train.batch_size // 2
    local = [{k: v[rank * half : (rank + 1) * half] for k, v in b.items()} for b in batches(cfg, 3)]
    built = init_state(cfg)
    placement = MeshPlacement(cfg, built.axes)
    _, losses, _ = run_steps(cfg, placement, local, [2, 1, 2], built=built)
    order = [d.process_index for d in placement.mesh.devices.flat]
    dump({"rank": rank, "devices": jax.device_count(), "losses": losses, "mesh_processes": order}, out)


def mode_single(out):
    from asura.parallel.placement import Placement

    cfg = cfg_for()
    _, losses, _ = run_steps(cfg, Placement(cfg), batches(cfg, 3), [2, 1, 2])
    dump({"losses": losses}, out)


def mode_pallas(out):
    """Pallas attention (interpret mode on CPU) inside shard_map on data x tensor meshes vs XLA on one device."""
    import jax

    from asura.config import with_overrides
    from asura.parallel.placement import MeshPlacement, Placement
    from asura.train.state import init_state

    cfg = with_overrides(cfg_for(), ["model.attention=xla", "model.n_kv_heads=2"])
    bs = batches(cfg, 2)
    assert "segment_ids" in bs[0]  # packed rows: the kernels get segment ids per shard too
    ref, _ = record(cfg, Placement(cfg), init_state(cfg), bs)
    shard_map_calls = []
    real_shard_map = jax.shard_map

    def counting_shard_map(*args, **kwargs):
        shard_map_calls.append(str(kwargs.get("in_specs")))
        return real_shard_map(*args, **kwargs)

    jax.shard_map = counting_shard_map
    res = {}
    for mesh in [(2, 2, 2)]:  # batch over data x fsdp, heads over tensor
        cfg_m = with_overrides(cfg_for(mesh), ["model.attention=pallas", "model.n_kv_heads=2"])
        shard_map_calls.clear()
        built = init_state(cfg_m)
        r, _ = record(cfg_m, MeshPlacement(cfg_m, built.axes), built, bs)
        r["shard_map_in_specs"] = sorted(set(shard_map_calls))
        res["x".join(map(str, mesh))] = r
    with open(out, "wb") as f:
        pickle.dump({"ref": ref, "meshes": res}, f)


def mode_loop(workdir, out):
    """The real train loop on a (2,4) mesh: straight vs stopped + resumed on (8,1)."""
    from pathlib import Path

    from asura.config import with_overrides
    from asura.train.loop import FAST_COMPILE, run
    from asura.train.optim import lr_schedule

    base = with_overrides(cfg_for((2, 4, 1)), ["train.steps=4", "train.eval_every=2", "train.checkpoint_every=2"])
    quiet = {"say": lambda m: None, "install_signal_handlers": False, "compiler_options": FAST_COMPILE}
    straight = run(base, Path(workdir) / "straight", **quiet)
    run(base, Path(workdir) / "resumed", hooks=stop_at(2), **quiet)
    resumed = run(with_overrides(base, ["mesh.data=8", "mesh.fsdp=1"]), Path(workdir) / "resumed", **quiet)
    a, b = flat(straight["params"]), flat(resumed["params"])
    dump(
        {
            "resumed_from": resumed["resumed_from"],
            "max_err": max(float(np.max(np.abs(a[k] - b[k]))) for k in a),
            "losses": [straight["eval"]["eval/ce"], resumed["eval"]["eval/ce"]],  # final eval at step 4
            "embed_spec": str(straight["params"]["embed"].sharding.spec),
            "lr_after_resume": [float(lr_schedule(base.train)(i)) for i in range(2, base.train.steps)],
        },
        out,
    )


def _bucket_cfg():
    from asura.config import with_overrides

    return with_overrides(cfg_for(), ["train.steps=4", "train.eval_every=2", "train.checkpoint_every=2"])


def _local_params(params) -> dict:
    """Each process's copy of replicated parameters (a global array is not addressable whole)."""
    import jax

    return {jax.tree_util.keystr(p): np.asarray(x.addressable_data(0))
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}  # fmt: skip


def mode_bucket(rank, port, workdir, out):
    rank = int(rank)
    os.environ.update(ASURA_COORDINATOR=f"127.0.0.1:{port}", ASURA_NUM_PROCESSES="2", ASURA_PROCESS_ID=str(rank))
    from asura.parallel.distributed import initialize

    initialize()
    from asura.train.loop import FAST_COMPILE, run

    quiet = {"say": lambda m: None, "install_signal_handlers": False, "compiler_options": FAST_COMPILE}
    straight = run(_bucket_cfg(), f"{workdir}-straight", **quiet)
    run(_bucket_cfg(), workdir, hooks=stop_at(2), **quiet)  # both processes write checkpoint 2 to the bucket
    res = run(_bucket_cfg(), workdir, **quiet)  # and both restore it
    with open(out, "wb") as f:
        pickle.dump({"resumed_from": res["resumed_from"], "params": _local_params(res["params"]),
                     "straight": _local_params(straight["params"])}, f)  # fmt: skip


def mode_bucket1(workdir, out):
    from asura.train.loop import FAST_COMPILE, run

    quiet = {"say": lambda m: None, "install_signal_handlers": False, "compiler_options": FAST_COMPILE}
    res = run(_bucket_cfg(), workdir, **quiet)
    with open(out, "wb") as f:
        pickle.dump({"params": _local_params(res["params"])}, f)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    modes = {
        "meshes": mode_meshes,
        "ckpt": mode_ckpt,
        "dist": mode_dist,
        "single": mode_single,
        "loop": mode_loop,
        "pallas": mode_pallas,
        "bucket": mode_bucket,
        "bucket1": mode_bucket1,
    }
    modes[mode](*args)
