"""Meshes beyond one slice (issue #30): the two-level (ICI x DCN) mesh config, its one-line refusals,
the hybrid layout on libtpu's multi-slice topology, the collective bytes read from compiled HLO, and
the chip table that MFU, the TPU compile and the kernels' lowering share.

The HLO reader is checked on small hand-written modules whose answers are worked out by hand, then
on a real multi-slice compile against what data parallelism must send: every gradient element
crosses the data-center network, and nothing does on one slice.
"""

from __future__ import annotations

import math

import pytest
from conftest import DEMO

from asura import aot
from asura.chips import CHIPS, chip_for, tpu_generations
from asura.config import ConfigError, load_config
from asura.hlo import Collective, collectives
from asura.parallel.mesh import MeshError, batch_split, mesh_levels

needs_libtpu = pytest.mark.skipif(
    not aot.libtpu_available(),
    reason="libtpu is not installed (optional extra: pip install -e '.[tpu]'; CI installs it)",
)


def mesh(*overrides):
    return load_config(DEMO, list(overrides)).mesh


# ------------------------------------------------------------------ the config and its refusals
def test_levels_multiply_and_fill_per_slice():
    levels = mesh_levels(mesh("mesh.dcn.data=4", "mesh.fsdp=2"), 64, slices=4)
    assert levels.dcn == {"data": 4, "fsdp": 1, "tensor": 1}
    assert levels.ici == {"data": 8, "fsdp": 2, "tensor": 1}  # -1 fills one slice's 16 devices
    assert levels.sizes == {"data": 32, "fsdp": 2, "tensor": 1} and levels.slices == 4
    # one level: every device, however many processes hold them
    assert mesh_levels(mesh("mesh.fsdp=2"), 8).sizes == {"data": 4, "fsdp": 2, "tensor": 1}


@pytest.mark.parametrize(
    "overrides, n, slices, granule, message",
    [
        ((), 8, 2, "slice", "the 8 devices span 2 slices: set mesh.dcn sizes that multiply to 2"),
        (("mesh.dcn.data=4",), 8, 2, "slice", "mesh.dcn {'data': 4, 'fsdp': 1, 'tensor': 1} spans 4 slices but the"),
        (("mesh.dcn.data=2",), 1, 1, "process", "spans 2 processes but the devices form 1 process"),
        (("mesh.dcn.data=2", "mesh.fsdp=3"), 8, 2, "slice", "fixed axes (3) do not divide the 4 devices per slice"),
        (("mesh.dcn.data=2", "mesh.data=2"), 16, 2, "slice", "needs 2 devices but 8 are available per slice"),
    ],
)
def test_bad_meshes_are_one_line(overrides, n, slices, granule, message):
    with pytest.raises(MeshError) as e:
        mesh_levels(mesh(*overrides), n, slices, granule)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_dcn_sizes_are_refused_at_config_time():
    with pytest.raises(ConfigError, match=r"mesh\.dcn\.data must be a positive size \(slices along data\), got 0"):
        mesh("mesh.dcn.data=0")
    with pytest.raises(ConfigError, match=r"unknown config key 'mesh\.dcn\.pipe'"):
        mesh("mesh.dcn.pipe=2")


def test_the_batch_split_follows_the_batch_rule():
    sizes = {"data": 4, "fsdp": 2, "tensor": 8}
    assert batch_split(mesh().rules, sizes) == 8  # data x fsdp by default
    assert batch_split({"batch": ("data",)}, sizes) == 4
    assert batch_split({"batch": ("data", "fsdp", "tensor")}, sizes) == 64
    assert batch_split({"batch": ()}, sizes) == 1


# ------------------------------------------------------------------ the chip table
def test_device_kinds_match_the_right_chip():
    assert chip_for("TPU v5 lite").peak_bf16_flops == 197e12  # v5e, not the v5p that "TPU v5" names
    assert chip_for("TPU v5").peak_bf16_flops == 459e12
    assert chip_for("TPU v5p") is CHIPS["v5p"] and chip_for("NVIDIA H100 80GB HBM3") is CHIPS["h100"]
    assert chip_for("cpu") is None and chip_for("NVIDIA GeForce RTX 4090") is None
    assert set(tpu_generations()) == {"v4", "v5e", "v5p", "v6e"}
    for name in tpu_generations():  # every generation parses as a topology of its dimensions
        chip = CHIPS[name]
        topo = aot.parse_topology(f"{name}:" + "x".join(["2"] * chip.torus_dims), 2)
        assert topo.chips == 2 * 2**chip.torus_dims and topo.chip is chip
    # v5e's DCN rate is its host's two 100 Gbit/s NICs over 8 chips; its pod total agrees
    assert CHIPS["v5e"].dcn_Gbps * 256 == 6400


def test_topology_refusals():
    with pytest.raises(ValueError, match="--slices 0: a run spans at least 1 slice"):
        aot.parse_topology("v5e:4x4", 0)
    with pytest.raises(ValueError, match="unknown TPU generation 'v9'; choose one of v4, v5e, v5p, v6e"):
        aot.parse_topology("v9:4x4")


# ------------------------------------------------------------------ the HLO reader
# ruff: noqa: E501 (HLO lines are as long as the compiler writes them)
HLO = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %r = f32[] add(f32[] %a, f32[] %b)
}

%body (p: (s32[], f32[64])) -> (s32[], f32[64]) {
  %ag = bf16[4,64]{1,0} all-gather(bf16[1,64]{1,0} %x), channel_id=3, replica_groups={{0,1,2,3}}, dimensions={0}
  %send.1 = (f32[32]{0}, u32[], token[]) send(%g, %t), channel_id=4, is_host_transfer=true, frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}
  %recv.1 = (f32[32]{0}, u32[], token[]) recv(%t), channel_id=5, is_host_transfer=true, frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}
}

%inner (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %cp = (f32[8]{0}, f32[8]{0}, u32[], u32[]) collective-permute-start(f32[8]{0} %y), source_target_pairs={{0,1},{1,0}}
}

%outer (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %w2 = (s32[], f32[8]) while(%p), condition=%c, body=%inner, backend_config={"known_trip_count":{"n":"5"}}
}

%split_start (q: bf16[2,64]) -> (bf16[2,64], bf16[8,64]) {
  %sg.1 = bf16[8,64]{1,0} all-gather(bf16[2,64]{1,0} %q), channel_id=11, replica_groups={{0,1,2,3}}, dimensions={0}
}

%split_done (q: bf16[2,64]) -> bf16[8,64] {
  %sg.2 = bf16[8,64]{1,0} all-gather(bf16[2,64]{1,0} %q), channel_id=11, replica_groups={{0,1,2,3}}, dimensions={0}
}

%shared (q: f32[4]) -> f32[4] {
  %sh = f32[4]{0} all-reduce(f32[4]{0} %q), channel_id=12, replica_groups={{0,1}}, to_apply=%add
}

%gathers (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %send.2 = (f32[16]{0}, u32[], token[]) send(%g2, %t), channel_id=13, is_host_transfer=true, frontend_attributes={_xla_host_transfer_rendezvous="all-gather.9_0",_xla_megascale_target={{100000,200000},{300000,400000}},_xla_megascale_transfer_type="ALL_GATHER"}
  %recv.2 = (f32[32]{0}, u32[], token[]) recv(%t), channel_id=14, is_host_transfer=true, frontend_attributes={_xla_host_transfer_rendezvous="all-gather.9_0",_xla_megascale_target={{100000,200000},{300000,400000}},_xla_megascale_transfer_type="ALL_GATHER"}
  %send.3 = (f32[8]{0}, u32[], token[]) send(%g3, %t), channel_id=15, is_host_transfer=true, frontend_attributes={_xla_host_transfer_rendezvous="all-reduce.3_0",_xla_megascale_target="{1,2,3,4}x{0:3}",_xla_megascale_transfer_type="ALL_REDUCE"}
}

ENTRY %main (x: f32[16]) -> f32[16] {
  %ar = (f32[16]{0}, bf16[8]{0}) all-reduce(f32[16]{0} %x, bf16[8]{0} %z), replica_groups=[2,4]<=[8], to_apply=%add
  %rs = f32[4]{0} reduce-scatter(f32[16]{0} %x), replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}, to_apply=%add
  %am = bf16[8,8]{1,0} all-reduce(bf16[8,8]{1,0} %v), channel_id=7, replica_groups=mesh['data'=4,'fsdp'=2,'tensor'=1] {'data','fsdp'}, to_apply=%add
  %w1 = (s32[], f32[64]) while(%init), condition=%c, body=%body
  %w3 = (s32[], f32[8]) while(%init2), condition=%c, body=%outer, backend_config={"known_trip_count":{"n":"2"}}
  %snd = (f32[4]{0}, u32[], token[]) send(%q, %t), channel_id=9
  %s1 = (bf16[2,64], bf16[8,64]) fusion(%q), kind=kCustom, calls=%split_start
  %s2 = bf16[8,64] fusion(%q), kind=kCustom, calls=%split_done
  %c1 = f32[4] call(%x), to_apply=%shared
  %c2 = f32[4] call(%x), to_apply=%shared
  %c3 = (s32[], f32[8]) call(%x), to_apply=%gathers
}
"""


def test_an_unknown_replica_group_format_is_an_error_not_a_guess():
    line = "  %x = f32[4]{0} all-reduce(f32[4]{0} %y), replica_groups=<new format>, to_apply=%add"
    with pytest.raises(ValueError, match=r"collective x: replica groups in a format asura\.hlo does not read"):
        collectives("HloModule m\n\nENTRY %main () -> f32[4] {\n" + line + "\n}\n")


def test_the_hlo_reader_on_a_module_worked_by_hand():
    got = {c.name: c for c in collectives(HLO, slices=2, loop_trips=3.0)}
    # recv and a plain send are not collectives; the split all-gather (start and done fusions, one
    # channel) is one collective
    assert set(got) == {"ar", "rs", "am", "ag", "send.1", "cp", "sg.1", "sh", "send.2", "send.3"}
    assert (got["sg.1"].payload, got["sg.1"].runs) == (1024, 1.0)
    assert got["sh"].runs == 2.0  # one computation called from two sites runs twice
    # a DCN all-gather: the gathered bytes (its recv), in groups of 2 slices of the 4; an all-reduce
    # whose target names slices {1,2,3,4}: all 4
    assert (got["send.2"].op, got["send.2"].payload, got["send.2"].group) == ("ALL_GATHER", 128, 2)
    assert (got["send.3"].payload, got["send.3"].group) == (32, 4)
    # mesh-axis groups (what XLA writes for large meshes): the listed axes, 4 x 2
    assert (got["am"].payload, got["am"].group) == (128, 8)
    # a tuple all-reduce: both buffers (64 + 16 bytes); iota groups [2,4]: 4 chips each
    assert got["ar"] == Collective("ar", "all-reduce", "ici", 80, 4, 1.0, in_loop=False)
    assert got["ar"].sent == 2 * 3 / 4 * 80
    # reduce-scatter: its input is the result times the group
    assert (got["rs"].payload, got["rs"].group, got["rs"].sent) == (64, 4, 3 / 4 * 64)
    # inside a while with no known trip count: loop_trips runs; the gathered (output) bytes
    assert (got["ag"].payload, got["ag"].runs, got["ag"].network) == (512, 3.0, "ici")
    assert got["send.1"] == Collective("send.1", "ALL_REDUCE", "dcn", 128, 2, 3.0, in_loop=True)
    assert got["send.1"].sent == 2 * 1 / 2 * 128
    # nested known trip counts multiply (2 x 5); a permute-start's payload is its result, sent once
    assert (got["cp"].payload, got["cp"].runs, got["cp"].sent, got["cp"].in_loop) == (32, 10.0, 32.0, True)
    assert not got["rs"].in_loop and got["ag"].in_loop


# ------------------------------------------------------------------ on libtpu's multi-slice topology
@needs_libtpu
def test_hybrid_mesh_puts_the_slices_on_the_dcn_axis_and_refuses_what_does_not_tile():
    import subprocess
    import sys

    code = """
from asura.aot import parse_topology, topology_devices
from asura.config import load_config
from asura.parallel.mesh import MeshError, make_mesh
two = topology_devices(parse_topology("v5e:2x2", 2))
m = make_mesh(load_config("configs/demo.yaml", ["mesh.dcn.data=2"]).mesh, two)
print("data", dict(m.shape), [d.slice_index for d in m.devices[:, 0, 0]])
m = make_mesh(load_config("configs/demo.yaml", ["mesh.dcn.fsdp=2", "mesh.data=1", "mesh.fsdp=-1"]).mesh, two)
print("fsdp", dict(m.shape), [d.slice_index for d in m.devices[0, :, 0]])
one = topology_devices(parse_topology("v5e:4x4"))
for ov in (["mesh.data=8", "mesh.fsdp=2", "mesh.allow_split_physical_axes=false"], ["mesh.data=8", "mesh.fsdp=2"]):
    try:
        print("split", dict(make_mesh(load_config("configs/demo.yaml", ov).mesh, one).shape))
    except MeshError as e:
        print("refused", e)
print("v4", len(topology_devices(parse_topology("v4:2x2x2"))))  # megacore: one device per chip
"""
    out = subprocess.run([sys.executable, "-c", code], env=aot.worker_env(), capture_output=True, text=True,
                         timeout=300, check=True).stdout.splitlines()  # fmt: skip
    assert out[0] == "data {'data': 8, 'fsdp': 1, 'tensor': 1} [0, 0, 0, 0, 1, 1, 1, 1]"  # DCN is the outer part
    assert out[1] == "fsdp {'data': 1, 'fsdp': 8, 'tensor': 1} [0, 0, 0, 0, 1, 1, 1, 1]"
    # never plain device order behind the user's back: without split physical axes a shape that
    # does not tile the 4x4 torus is refused in one line; with them (the default) it is laid out
    assert out[2].startswith("refused mesh {'data': 8, 'fsdp': 2, 'tensor': 1}") and "allow_split_physical" in out[2]
    assert out[3] == "split {'data': 8, 'fsdp': 2, 'tensor': 1}"
    assert out[4] == "v4 8"


@needs_libtpu
def test_a_two_slice_compile_sends_every_gradient_over_dcn_and_one_slice_sends_nothing():
    """looped_tiny, pure data parallelism: each gradient element must cross slices once (some chip
    sends its share), so the DCN all-reduce payloads summed over a slice's chips cover the gradient
    bytes (fp32); on one slice the program has no DCN transfer at all."""
    from asura.flops import param_count

    base = ["--config", "configs/presets/looped_tiny.yaml", "train.batch_size=16"]
    res, rc, log = aot.run_worker([*base, "--topology", "v5e:2x2", "--slices", "2", "mesh.dcn.data=2"], 600)
    assert rc == 0 and res["status"] == "ok", log
    assert res["slices"] == 2 and res["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    dcn, ici = res["collectives"]["dcn"], res["collectives"]["ici"]
    cfg = load_config("configs/presets/looped_tiny.yaml", ["train.batch_size=16"])
    grad_bytes = 4 * param_count(cfg).unique
    # the loop's transfers ran `runs` times at the expected depth: count each op once for coverage
    assert dcn["ops"] > 0 and set(dcn["sent_by_op"]) == {"ALL_REDUCE"}
    # Each op counted once (the loop's transfers reduce the shared stack's gradient on each pass):
    # the 4 chips of a slice together must send every gradient element at least once, and no chip
    # sends an element twice, so a chip's total lies between a quarter of the gradient and all of it
    # (plus the metrics' scalars: a few KiB)
    assert grad_bytes / 4 <= dcn["payload_once"] <= grad_bytes + 4096, (dcn["payload_once"], grad_bytes)
    assert ici["ops"] > 0
    single, rc, log = aot.run_worker([*base, "--topology", "v5e:2x4"], 600)
    assert rc == 0 and single["status"] == "ok", log
    assert single["slices"] == 1 and single["collectives"]["dcn"]["ops"] == 0
    assert math.isclose(single["collectives"]["loop_trips"], res["collectives"]["loop_trips"])


def test_overrides_may_sit_on_both_sides_of_the_flags():
    # `asura.aot ... --topology v5e:2x2 --slices 2 mesh.dcn.data=2` (the README's) once failed with
    # "unrecognized arguments": argparse took only the overrides before the first flag
    from asura.config.cli import parse_config_args

    def extra(p):
        p.add_argument("--topology")

    argv = ["train.batch_size=16", "--config", str(DEMO), "--topology", "v5e:2x2", "mesh.dcn.data=2", "train.seed=3"]
    cfg, args = parse_config_args(argv, "t", "test", extra)
    assert (cfg.train.batch_size, cfg.mesh.dcn.data, cfg.train.seed, args.topology) == (16, 2, 3, "v5e:2x2")


def test_the_fsdp_suggestion_reads_the_resolved_sizes():
    # a config that already shards over the whole slice (fsdp=-1 resolves to 16) is not told to set
    # mesh.fsdp=16; one that does not is; with 2 slices the suggestion is per slice
    topo = aot.parse_topology("v5e:4x4")
    res = {"state_bytes": 6 * aot.GIB, "param_bytes": 2 * aot.GIB}  # params + Adam: over a quarter of HBM
    have = 16 * aot.GIB

    def fsdp_hint(*overrides, t=topo):
        return [s for s in aot.suggestions(load_config(DEMO, list(overrides)), t, res, 2 * have, have) if "fsdp" in s]

    assert fsdp_hint("mesh.data=1", "mesh.fsdp=-1") == []
    assert fsdp_hint("mesh.fsdp=2")[0].startswith("mesh.fsdp=16 mesh.data=1")
    two = aot.parse_topology("v5e:4x4", 2)
    assert fsdp_hint("mesh.fsdp=2", "mesh.dcn.data=2", t=two)[0].startswith("mesh.fsdp=16 mesh.data=1")


def test_an_unreadable_program_keeps_the_rest_of_the_report():
    cfg = load_config(DEMO, [])
    bad = "HloModule m\n\nENTRY %main () -> f32[4] {\n  %x = f32[4]{0} all-reduce(f32[4]{0} %y), replica_groups=?\n}\n"
    got = aot.read_collectives(cfg, bad, 1)
    assert (
        got["collectives"] is None and "replica groups in a format asura.hlo does not read" in got["collectives_error"]
    )
    assert aot.read_collectives(cfg, HLO, 2)["collectives"]["dcn"]["ops"] == 3
