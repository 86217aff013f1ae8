"""Resume at another world size, with real DeepSpeed ZeRO-1 engines over gloo on 127.0.0.1.

N ranks train a tiny Swin V2 and save through CheckpointManager (every step); M ranks load it (train/checkpoint.py
converts it to DeepSpeed's universal format) and at once save it again. Both checkpoints must hold
the same full fp32 weights, Adam moments and step counts, for 2 -> 1 and 1 -> 2, fp32 and bf16.
The worker side runs as ``python tests/test_resize.py MODE RUN_DIR PRECISION [OUT_DIR]``.
"""
from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import pytest  # noqa: E402
import torch  # noqa: E402

SAVED_STEP = 2


def _env(rank: int, world: int, port: int) -> dict:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), CUDA_VISIBLE_DEVICES="",
               DS_ACCELERATOR="cpu", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    return env


def run_ranks(world: int, *args: str) -> list:
    """Start `world` worker processes (one per rank) and return each one's JSON result."""
    from swinv2_train.distributed import free_port

    port = free_port()
    procs = [subprocess.Popen([sys.executable, __file__, *args], env=_env(r, world, port), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(world)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (so, se) in zip(procs, outs):
        assert p.returncode == 0, (so + se)[-4000:]
    return [json.loads(so.strip().splitlines()[-1]) for so, _ in outs]


def zero_state(tag_dir: str) -> dict:
    """{"fp32" | "exp_avg" | "exp_avg_sq": {param name: full tensor}, "step": [per group]}
    reassembled from every rank's ZeRO-1 optimizer partition (padding only at the end)."""
    ms = torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
    files = sorted(glob.glob(os.path.join(tag_dir, "*zero_pp_rank_*_mp_rank_00_optim_states.pt")),
                   key=lambda f: int(re.search(r"zero_pp_rank_(\d+)_", f).group(1)))
    parts = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"] for f in files]
    out = {"fp32": {}, "exp_avg": {}, "exp_avg_sq": {}, "step": []}
    for g, shapes in enumerate(ms["param_shapes"]):
        moments = [p["base_optimizer_state"]["state"][g] for p in parts]
        flats = {"fp32": torch.cat([p["single_partition_of_fp32_groups"][g].flatten() for p in parts]),
                 **{k: torch.cat([m[k].flatten() for m in moments]) for k in ("exp_avg", "exp_avg_sq")}}
        out["step"].append({float(m["step"]) for m in moments})
        off = 0
        for name, shape in shapes.items():
            for key, flat in flats.items():
                out[key][name] = flat[off:off + shape.numel()].view(shape)
            off += shape.numel()
    return out


def assert_same_state(saved_dir: str, loaded_dir: str) -> None:
    a, b = zero_state(saved_dir), zero_state(loaded_dir)
    assert a["step"] == b["step"] and all(len(s) == 1 for s in a["step"]), (a["step"], b["step"])
    assert a["step"][0] == {float(SAVED_STEP)}
    for key in ("fp32", "exp_avg", "exp_avg_sq"):
        assert a[key].keys() == b[key].keys() and a[key]
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key} of {name} differs after the resize"
        assert any(t.abs().sum() > 0 for t in a[key].values())  # the comparison is not of zeros


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("saved_world,loaded_world", [(2, 1), (1, 2)])
def test_resume_at_another_world_size_keeps_weights_and_adam_state(tmp_path, saved_world, loaded_world, precision):
    run, again = str(tmp_path / "run"), str(tmp_path / "again")
    run_ranks(saved_world, "save", run, precision)
    outs = run_ranks(loaded_world, "load", run, precision, again)
    saved = os.path.join(run, "checkpoints", f"step_{SAVED_STEP:08d}")
    assert os.path.isfile(os.path.join(saved, "universal", "zero", "optimizer_state.pt"))  # converted once
    assert not os.path.exists(os.path.join(saved, "latest_universal"))
    assert_same_state(saved, os.path.join(again, "checkpoints", f"step_{SAVED_STEP:08d}"))
    for rank, out in enumerate(outs):
        assert out["step"] == SAVED_STEP and out["data_position"] == [0, SAVED_STEP]
        assert out["seen"] == SAVED_STEP  # a buffer: restored although the universal load skips the module
        assert out["module_matches_master"]  # the (bf16) module weights follow the fp32 master
        assert out["next_loss_finite"]
        # rank r keeps rng_rank{r}; a rank the checkpoint did not have gets fresh, distinct streams
        assert out["rng_keys"] == ["mixup", "numpy", "python", "torch"]
        assert out["rng_from_file"] == (rank < saved_world)
    if loaded_world > saved_world:
        assert len({o["torch_rng_digest"] for o in outs}) == loaded_world


# ----------------------------------------------------------------------------- worker side
def _train_step(engine, step: int, rank: int) -> float:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(2, 3, 32, 32, generator=gen).to(next(engine.module.parameters()).dtype)
    y = torch.randint(0, 10, (2,), generator=gen)
    loss = torch.nn.functional.cross_entropy(engine(x).float(), y)
    engine.backward(loss)
    engine.step()
    engine.module.seen += 1
    return loss.item()


def _engine(world: int, precision: str):
    import deepspeed

    import swinv2

    torch.manual_seed(0)
    model = swinv2.create_model("tiny", img_size=32, window_size=4, num_classes=10, drop_path_rate=0.0,
                                embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))
    model.register_buffer("seen", torch.zeros(1))  # trained state outside the optimizer (like BN statistics)
    config = {"train_batch_size": 2 * world, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "gradient_clipping": 1.0, "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10**12}
    if precision == "bf16":  # as train/parallelize.py: BF16_Optimizer (fp32 accumulation)
        config.update(bf16={"enabled": True}, data_types={"grad_accum_dtype": "fp32", "buffer_dtype": "bf16"})
    optimizer = torch.optim.AdamW(swinv2.param_groups(model, 0.05), lr=1e-3)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def _worker(mode: str, run_dir: str, precision: str, out_dir: str = "") -> None:
    import hashlib

    from swinv2_train.checkpoint import CheckpointManager, latest_committed
    from swinv2_train.distributed import init_distributed, shutdown

    env = init_distributed()
    engine = _engine(env.world_size, precision)
    client = {"config": {"run": {"seed": 0}}, "data_position": [0, SAVED_STEP]}
    mixup = {"mixup": torch.Generator().manual_seed(7 + env.rank).get_state()}
    out = {}
    if mode == "save":  # a checkpoint at every step: step_1, step_2
        manager = CheckpointManager(run_dir, keep=2, rank=env.rank, world_size=env.world_size)
        for step in range(1, SAVED_STEP + 1):
            _train_step(engine, step, env.rank)
            manager.save(engine, step, dict(client, data_position=[0, step]), extra_rng=mixup)
    else:
        tag_dir = latest_committed(os.path.join(run_dir, "checkpoints"))
        loaded = CheckpointManager(run_dir, keep=2, rank=env.rank, world_size=env.world_size).load(engine, tag_dir)
        rng = loaded["rng"]
        master = dict(engine.module.named_parameters())
        out = {"step": loaded["step"], "data_position": list(loaded["data_position"]),
               "seen": engine.module.seen.item(), "rng_keys": sorted(rng),
               "rng_from_file": torch.equal(rng["mixup"], mixup["mixup"]),
               "torch_rng_digest": hashlib.sha1(rng["torch"].numpy().tobytes()).hexdigest()}
        CheckpointManager(out_dir, keep=2, rank=env.rank, world_size=env.world_size).save(
            engine, SAVED_STEP, client, extra_rng=mixup)
        again = zero_state(os.path.join(out_dir, "checkpoints", f"step_{SAVED_STEP:08d}"))["fp32"]
        out["module_matches_master"] = all(torch.equal(p.detach(), again[n].to(p.dtype)) for n, p in master.items())
        out["next_loss_finite"] = bool(torch.isfinite(torch.tensor(_train_step(engine, SAVED_STEP + 1, env.rank))))
    shutdown()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    _worker(*sys.argv[1:])
    # The result is out: skip the interpreter's teardown. About 1 run in 16 on 2 cores, a rank aborted there,
    # after destroy_process_group ("terminate called without an active exception": a C++ thread still
    # joinable when its owner is destroyed at exit), failing a test whose checks had all been made.
    sys.stderr.flush()
    os._exit(0)
