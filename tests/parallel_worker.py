"""Subprocess body for tests/test_parallel.py (needs its own XLA_FLAGS / jax.distributed).

Modes:
  meshes  OUT.json            sharded step == single-device step for several meshes
  ckpt    WORKDIR OUT.json    save on (2,4), restore onto (8,1) and (1,1)
  dist    RANK PORT OUT.json  one of two jax.distributed processes; 3 train steps
  single  OUT.json            the same 3 steps in one process (reference for `dist`)
  loop    WORKDIR OUT.json    the real train loop on (2,4), resumed onto (8,1)
  pallas  OUT.json            attention=pallas per shard (shard_map) on meshes == xla on one device
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

OVERRIDES = [
    "model.d_model=32",
    "model.n_heads=4",
    "model.n_layers=1",
    "model.iterations=2",
    "model.max_iterations=2",
    "model.vocab_size=128",
    "model.adapter=abba",
    "model.adapter_rank=2",
    "model.adapter_rank2=2",
    "model.guidance=linear",
    "data.seq_len=32",
    "data.difficulty=2",
    "train.batch_size=8",
    "train.lr=1e-2",
    "train.warmup_steps=0",
]


def dump(obj, path) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)


def cfg_for(mesh: tuple[int, int, int] = (-1, 1, 1)):
    from asura.config import load_config

    d, f, t = mesh
    return load_config("configs/demo.yaml", [*OVERRIDES, f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.tensor={t}"])


def batches(cfg, n, process_index=0, process_count=1):
    from asura.data.pipeline import build_eval_batches

    return build_eval_batches(cfg, n, process_index=process_index, process_count=process_count)


def run_steps(cfg, placement, local_batches, depths):
    import jax
    import jax.numpy as jnp

    from asura.train.state import init_state
    from asura.train.step import make_train_step

    graphdef, rest, state = init_state(cfg)
    state = placement.state(state)
    step = placement.jit_step(make_train_step(cfg, graphdef, rest))
    losses = []
    for b, n in zip(local_batches, depths, strict=True):
        state, m = step(state, placement.batch(b), jnp.int32(n), jnp.float32(1.0))
        losses.append(float(m["loss"]))
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), state["params"])
    return state, losses, params


def flat(tree):
    import jax

    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def mode_meshes(out):
    from asura.parallel.placement import MeshPlacement
    from asura.train.state import Placement

    cfg = cfg_for()
    bs = batches(cfg, 2)
    _, ref_losses, ref_params = run_steps(cfg, Placement(cfg), bs, [2, 1])
    ref_flat = flat(ref_params)
    results = {}
    for mesh in [(8, 1, 1), (2, 4, 1), (1, 8, 1), (2, 2, 2)]:
        cfg_m = cfg_for(mesh)
        placement = MeshPlacement(cfg_m)
        state, losses, params = run_steps(cfg_m, placement, bs, [2, 1])
        got = flat(params)
        max_err = max(float(np.max(np.abs(got[k] - ref_flat[k]))) for k in ref_flat)
        specs = {
            k: str(x.sharding.spec)
            for k, x in flat_arrays(state["params"]).items()
            if hasattr(x, "sharding") and hasattr(x.sharding, "spec")
        }
        opt_specs = [str(x.sharding.spec) for x in flat_arrays(state["opt_state"]).values() if np.ndim(x) >= 2]
        results["x".join(map(str, mesh))] = {
            "losses": losses,
            "max_param_err": max_err,
            "specs": specs,
            "opt_specs": opt_specs,
        }
    dump({"ref_losses": ref_losses, "meshes": results}, out)


def flat_arrays(tree):
    import jax

    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def mode_ckpt(workdir, out):
    import jax

    from asura.parallel.placement import MeshPlacement
    from asura.train.checkpoint import CheckpointStore
    from asura.train.state import abstract_state

    cfg = cfg_for((2, 4, 1))
    placement = MeshPlacement(cfg)
    state, _, params = run_steps(cfg, placement, batches(cfg, 1), [2])
    store = CheckpointStore(workdir, keep=2, async_save=True)
    store.save(1, state, {"note": "test"}, {"step": 1})
    store.close()
    saved = flat(params)
    res = {}
    for mesh in [(8, 1, 1), (1, 1, 1)]:
        cfg_m = cfg_for(mesh)
        devices = jax.devices()[: int(np.prod(mesh))]
        from asura.parallel.mesh import make_mesh

        pl = MeshPlacement(cfg_m, make_mesh(cfg_m.mesh, devices))
        _, _, shapes = abstract_state(cfg_m)
        target = pl.abstract(shapes)
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


def mode_dist(rank, port, out):
    rank = int(rank)
    os.environ.update(ASURA_COORDINATOR=f"127.0.0.1:{port}", ASURA_NUM_PROCESSES="2", ASURA_PROCESS_ID=str(rank))
    from asura.parallel.distributed import initialize

    initialize()
    import jax

    from asura.parallel.placement import MeshPlacement

    cfg = cfg_for()
    # The same global batches as `single`, each process holding its half of the rows.
    half = cfg.train.batch_size // 2
    local = [{k: v[rank * half : (rank + 1) * half] for k, v in b.items()} for b in batches(cfg, 3)]
    _, losses, _ = run_steps(cfg, MeshPlacement(cfg), local, [2, 1, 2])
    dump({"rank": rank, "devices": jax.device_count(), "losses": losses}, out)


def mode_single(out):
    from asura.train.state import Placement

    cfg = cfg_for()
    _, losses, _ = run_steps(cfg, Placement(cfg), batches(cfg, 3), [2, 1, 2])
    dump({"losses": losses}, out)


def mode_pallas(out):
    """Pallas attention (interpret mode on CPU) inside shard_map on data x tensor meshes vs XLA on one device."""
    import jax

    from asura.config import with_overrides
    from asura.parallel.placement import MeshPlacement
    from asura.train.state import Placement

    cfg = with_overrides(cfg_for(), ["model.attention=xla", "model.n_kv_heads=2"])
    bs = batches(cfg, 2)
    assert "segment_ids" in bs[0]  # packed rows: the kernels get segment ids per shard too
    _, ref_losses, ref_params = run_steps(cfg, Placement(cfg), bs, [2, 1])
    ref_flat = flat(ref_params)
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
        _, losses, params = run_steps(cfg_m, MeshPlacement(cfg_m), bs, [2, 1])
        got = flat(params)
        res["x".join(map(str, mesh))] = {
            "losses": losses,
            "max_param_err": max(float(np.max(np.abs(got[k] - ref_flat[k]))) for k in ref_flat),
            "shard_map_in_specs": sorted(set(shard_map_calls)),
        }
    dump({"ref_losses": ref_losses, "meshes": res}, out)


def mode_loop(workdir, out):
    """The real train loop on a (2,4) mesh: straight vs stopped + resumed on (8,1)."""
    from pathlib import Path

    from asura.config import with_overrides
    from asura.train.loop import FAST_COMPILE, run

    base = with_overrides(cfg_for((2, 4, 1)), ["train.steps=4", "train.eval_every=2", "train.checkpoint_every=2"])
    quiet = {"say": lambda m: None, "install_signal_handlers": False, "compiler_options": FAST_COMPILE}
    straight = run(base, Path(workdir) / "straight", **quiet)
    run(base, Path(workdir) / "resumed", stop_after=2, **quiet)
    resumed = run(with_overrides(base, ["mesh.data=8", "mesh.fsdp=1"]), Path(workdir) / "resumed", **quiet)
    a, b = flat(straight["params"]), flat(resumed["params"])
    dump(
        {
            "resumed_from": resumed["resumed_from"],
            "max_err": max(float(np.max(np.abs(a[k] - b[k]))) for k in a),
            "losses": [straight["eval"]["eval/loss"], resumed["eval"]["eval/loss"]],  # final eval at step 4
            "embed_spec": str(straight["params"]["embed"].sharding.spec),
        },
        out,
    )


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    modes = {
        "meshes": mode_meshes,
        "ckpt": mode_ckpt,
        "dist": mode_dist,
        "single": mode_single,
        "loop": mode_loop,
        "pallas": mode_pallas,
    }
    modes[mode](*args)
