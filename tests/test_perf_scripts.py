"""The performance tools run and compute what they claim (no timing assertions here: speed and
memory TARGETS are in scripts/bench.py output and docs/PERFORMANCE.md)."""
import json
import os
import platform
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from swinv2_tools import memory_model as mm

REPO = Path(__file__).resolve().parents[1]
# the fields swinv2_tools.bench_meta.bench_metadata records, and the benchmarks that record them
BENCH_META_FIELDS = {"date", "command", "host", "machine", "platform", "python", "torch", "cpu_model", "cores",
                     "threads", "loadavg", "git_commit", "git_dirty"}
BENCHMARKS = ("bench.py", "bench_gpu.py", "bench_compile.py", "bench_checkpointing.py", "bench_loader.py",
              "memory_model.py")


def _block_params(C: int, heads: int, mlp_ratio: int = 4, cpb_hidden: int = 512) -> int:
    # norm1 + norm2 (2C each), logit_scale (heads), q_bias + v_bias (2C), cpb_mlp Linear(2, 512)
    # with bias + Linear(512, heads) without, qkv (3C x C, no bias), proj (C x C + C), mlp fc1/fc2
    return (4 * C + heads + 2 * C + (2 * cpb_hidden + cpb_hidden + cpb_hidden * heads) + 3 * C * C
            + (C * C + C) + (C * mlp_ratio * C + mlp_ratio * C) + (mlp_ratio * C * C + C))


def _hand_params(C, depths, heads, num_classes, extra_norm_every=0, in_chans=3, patch=4):
    n = in_chans * patch * patch * C + C + 2 * C  # patch_embed conv + LN
    for i, (d, h) in enumerate(zip(depths, heads)):
        Ci = C * 2**i
        n += d * _block_params(Ci, h)
        if extra_norm_every:
            n += (d // extra_norm_every) * 2 * Ci
        if i < len(depths) - 1:
            n += 4 * Ci * 2 * Ci + 2 * 2 * Ci  # patch merging: reduction (no bias) + LN(2C)
    Cl = C * 2 ** (len(depths) - 1)
    n += 2 * Cl  # final norm
    if num_classes:
        n += Cl * num_classes + num_classes
    return n


def test_param_count_matches_hand_computation_small_and_tiny():
    assert mm.count_params("tiny", embed_dim=16, depths=(1, 2), num_heads=(1, 2), num_classes=10,
                           pretrained_window_sizes=(0, 0)) == \
        _hand_params(16, (1, 2), (1, 2), 10)
    assert mm.count_params("tiny") == _hand_params(96, (2, 2, 6, 2), (3, 6, 12, 24), 1000)
    assert abs(mm.count_params("tiny") - 28.35e6) < 0.01e6  # the official model's count


def test_giant_param_count_on_meta_device():
    p = mm.count_params("giant", num_classes=0)
    assert p == _hand_params(512, (2, 2, 42, 4), (16, 32, 64, 128), 0, extra_norm_every=6)
    # 2997.8M for the official-code backbone (no extra norms) + 7 extra LayerNorms of stage 3
    assert abs((p - 7 * 2 * 2048) - 2997.8e6) < 0.1e6
    assert mm.count_params("giant") == p + 4096 * 1000 + 1000


def test_state_bytes_zero1_arithmetic():
    P = 1_000_000
    assert mm.state_bytes(P, "fp32", 1) == dict(params=4e6, grads=4e6, optimizer=8e6, ds_fp32_grad_acc=0.0)
    # bf16: bf16 params + grads replicated; fp32 master + Adam m, v = 12 bytes split over N ranks
    s = mm.state_bytes(P, "bf16", 8)
    assert (s["params"], s["grads"], s["optimizer"]) == (2e6, 2e6, 12e6 / 8)
    assert mm.state_bytes(P, "bf16", 8, ds_fp32_grad_acc=True)["ds_fp32_grad_acc"] == 4e6
    # the paper's "3B model with fp32 weights and AdamW states = 48 GB" without ZeRO: 16 bytes/param
    s = mm.state_bytes(3_000_000_000, "fp32", 1)
    assert s["params"] + s["grads"] + s["optimizer"] == 48e9
    with pytest.raises(ValueError):
        mm.state_bytes(P, "fp16", 1)
    with pytest.raises(ValueError):
        mm.state_bytes(P, "bf16", 0)


def test_activation_prediction_scales_attention_only_without_sequential():
    co = mm.Coefficients("reference", "fp32", alpha=10.0, beta=2.0, const_per_table=0.0, other_per_tc={},
                         residual_bytes=4, gamma={False: 0.0, True: 0.0})
    cfg = __import__("swinv2").SwinV2Config.from_variant("tiny", img_size=256, window_size=8)
    ref = mm.predict_activations(cfg, 256, 8, 1, False, co)
    # hand: every block holds alpha*T*C + beta*T*nH*N
    hand = sum(d * (10.0 * (64 // 2**i) ** 2 * 96 * 2**i + 2.0 * (64 // 2**i) ** 2 * h * 64)
               for i, (d, h) in enumerate(zip((2, 2, 6, 2), (3, 6, 12, 24))))
    assert ref["held"] == pytest.approx(hand)
    seq = mm.predict_activations(cfg, 256, 8, 1, False, mm.Coefficients(**{**co.__dict__, "attention": "sequential"}))
    assert seq["held"] < ref["held"]
    ck = mm.predict_activations(cfg, 256, 8, 1, True, co)  # checkpointing keeps block inputs only
    assert ck["held"] == pytest.approx(sum(d * (64 // 2**i) ** 2 * 96 * 2**i * 4 for i, d in enumerate((2, 2, 6, 2))))


def test_memory_model_uses_the_model_window_geometry():
    # the memory model takes window and shift from swinv2's one rule (clipped small stages), and
    # pads a stage the window does not tile (W32 at 1536: 48x48 -> 64x64) as detection does
    import swinv2

    cfg = swinv2.SwinV2Config.from_variant("tiny", img_size=256, window_size=16)
    geo = mm._stage_geometry(cfg, 256, 16, batch=1)
    assert [g["window"] for g in geo[::2]][:3] == [16, 16, 16] and geo[-1]["window"] == 8  # 8x8 stage clipped
    assert [g["window"] for g in geo] == [cfg.stage_window(g["stage"]).window for g in geo]
    with torch.device("meta"):
        model = swinv2.create_model("tiny", img_size=256, window_size=16)
    assert [(g["stage"], g["window"]) for g in mm._block_geometry(model)] == [(g["stage"], g["window"]) for g in geo]
    giant = mm._stage_geometry(swinv2.SwinV2Config.from_variant("giant", img_size=1536, window_size=24), 1536, 32, 1)
    last = giant[-1]
    assert (last["res"], last["window"], last["att_tokens"]) == (48, 32, 64 * 64)


def test_bench_quick_writes_json_with_both_models(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--quick",
                        "--configs", "quick_hf,quick_sequential", "--profile", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert BENCH_META_FIELDS | {"transformers"} <= set(data["meta"])
    assert data["meta"]["command"] == f"scripts/bench.py --quick --configs quick_hf,quick_sequential --profile --out {out}"
    rows = {row["name"]: row for row in data["results"]}
    assert set(rows) == {"quick_hf", "quick_sequential"}
    assert rows["quick_hf"]["model"] == "hf" and rows["quick_sequential"]["model"] == "ours"
    for row in rows.values():
        assert "error" not in row
        assert row["fwd_s"] > 0 and row["bwd_s"] > 0 and row["peak_rss_gb"] > row["base_rss_gb"] > 0
        assert row["params"] > 1e6 and abs(row["loss"]) < 100
        # per-step CPU accounting (tick-coarse, so a short step may read 0): never more CPU time than
        # the step's wall time on every core, which a process-lifetime total would exceed
        cpu = row["cpu_user_s"] + row["cpu_sys_s"]
        assert 0 <= cpu <= row["step_s"] * data["meta"]["cores"] + 0.05
        # --profile: both models spend time in linear-layer and attention matrix products, part of the total
        assert 0 < row["linear_gemm_s"] and 0 < row["attention_gemm_s"]
        assert row["linear_gemm_s"] + row["attention_gemm_s"] < row["profiled_self_s"]
    # both models have the same geometry (tiny): parameter counts within the HF layout differences
    assert rows["quick_hf"]["params"] == pytest.approx(rows["quick_sequential"]["params"], rel=0.01)
    assert rows["quick_hf"]["mem_ratio_vs_peer"] == 1.0
    assert rows["quick_sequential"]["mem_ratio_vs_peer"] > 0
    assert "quick_sequential" in r.stdout and "mem/peer" in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_bench_gpu_refuses_on_cpu():
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_gpu.py")], capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    assert r.returncode != 0
    assert "needs a CUDA GPU" in r.stderr and "Nothing was measured" in r.stderr
    assert "Traceback" not in r.stderr


def _bare_checkout(tmp_path: Path) -> tuple[Path, list[str], dict[str, str]]:
    """A GPU node's bare checkout: this repository's swinv2/, scripts/ and train/ copied (the project is not
    installed there), and the command prefix + environment of an interpreter that has the installed
    third-party packages (torch, transformers) but not this project: `python -S` skips the .pth files
    (this checkout's editable install among them), PYTHONPATH keeps the package folders."""
    checkout = tmp_path / "checkout"
    for folder in ("swinv2", "scripts", "train"):
        shutil.copytree(REPO / folder, checkout / folder, ignore=shutil.ignore_patterns("__pycache__"))
    packages = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    return checkout, [sys.executable, "-S"], {**os.environ, "PYTHONPATH": os.pathsep.join(packages)}


def test_bench_gpu_builds_both_models_from_a_bare_checkout(tmp_path):
    # the GPU node has torch and transformers but the project is not pip-installed there: bench_gpu
    # imports bench by its one name, swinv2_tools.bench, bound to the checkout's scripts/ folder
    # (and swinv2 to its swinv2/), and builds ours and the HF peer (here on the CPU)
    pytest.importorskip("transformers")
    checkout, python, env = _bare_checkout(tmp_path)
    code = f"""
import importlib.util, runpy, sys, torch
assert not any(importlib.util.find_spec(n) for n in ("swinv2_tools", "swinv2", "swinv2_train")), "installed"
bench_gpu = runpy.run_path({str(checkout / "scripts" / "bench_gpu.py")!r})
for impl in ("ours", "hf"):
    model = bench_gpu["build"](impl, dict(variant="tiny", img=64, window=4), "fused", device="cpu")
    print(impl, tuple(model(torch.randn(2, 3, 64, 64)).shape))
bench = bench_gpu["bench"]
print(bench.__name__, bench.__file__, sys.modules["swinv2"].__file__)
print(sorted(n for n in sys.modules if n.split(".")[0] in ("scripts", "train", "swinv2_train", "bench")))
"""
    r = subprocess.run([*python, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:2] == ["ours (2, 1000)", "hf (2, 1000)"]
    assert lines[2].split() == ["swinv2_tools.bench", str(checkout / "scripts" / "bench.py"),
                                str(checkout / "swinv2" / "__init__.py")]
    # one name for bench; of train/ only the GPU table (standard library), as swinv2_train.gpus
    assert lines[3] == "['swinv2_train', 'swinv2_train.gpus']"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_bench_gpu_documented_command_runs_from_a_bare_checkout(tmp_path):
    # docs/PERFORMANCE.md's device check, as typed, from a bare checkout: on this CPU machine it gets as
    # far as the CUDA check (every import resolved) and refuses there
    checkout, python, env = _bare_checkout(tmp_path)
    cmd = [*python, "scripts/bench_gpu.py", "--configs", "base256_w8", "--batch", "128", "--steps", "5",
           "--out", str(tmp_path / "bench_gpu.json")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=checkout,
                       env={**env, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 2, r.stderr
    assert "needs a CUDA GPU" in r.stderr and "Traceback" not in r.stderr


def test_bench_gpu_results_file_holds_every_finished_row(tmp_path):
    # a lent GPU's command is killed at its time limit: the rows measured before then must be in the file
    bench_gpu = runpy.run_path(str(REPO / "scripts" / "bench_gpu.py"))
    out = tmp_path / "bench_gpu.json"
    res = {"meta": {"gpu": "test"}, "rows": []}
    for batch in (64, 128):
        bench_gpu["record"](res, {"config": "base256_w8", "batch": batch}, str(out))
        assert [r["batch"] for r in json.loads(out.read_text())["rows"]] == [64, 128][:len(res["rows"])]
    assert json.loads(out.read_text())["meta"] == {"gpu": "test"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench_gpu.json"]


def test_bench_metadata_describes_the_run():
    from datetime import datetime

    import numpy
    from swinv2_tools.bench_meta import bench_metadata, summary_line

    meta = bench_metadata(str(REPO / "scripts" / "bench.py"), ["--quick", "--out", "q.json"],
                          packages=["numpy", "no_such_package_here"], batch=8)
    assert BENCH_META_FIELDS <= set(meta)
    assert meta["command"] == "scripts/bench.py --quick --out q.json"
    assert datetime.fromisoformat(meta["date"]).utcoffset().total_seconds() == 0
    assert meta["torch"] == torch.__version__ and meta["threads"] == torch.get_num_threads()
    assert meta["python"] == platform.python_version() and meta["machine"] == platform.machine()
    assert meta["cpu_model"] and 1 <= meta["cores"] <= os.cpu_count() and len(meta["loadavg"]) == 3
    assert ("gpu" in meta) == ("cuda" in meta) == torch.cuda.is_available()
    assert meta["numpy"] == numpy.__version__ and meta["no_such_package_here"].startswith("not importable: ")
    assert meta["batch"] == 8
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO)
    if head.returncode == 0:  # a git checkout (CI's is a fresh clone)
        assert meta["git_commit"] == head.stdout.strip() and isinstance(meta["git_dirty"], bool)
    assert json.loads(json.dumps(meta)) == meta
    assert summary_line(meta).startswith(meta["date"]) and meta["cpu_model"] in summary_line(meta)


def test_scripts_leave_sys_path_alone_and_share_one_metadata_helper():
    # scripts import the installed packages (swinv2, swinv2_train, swinv2_tools.*): none edits sys.path
    # or its children's PYTHONPATH (bench_gpu's bare checkout binds package names, see its test above);
    # every benchmark's metadata comes from swinv2_tools.bench_meta, the only place that builds it
    import ast

    for path in sorted((REPO / "scripts").glob("*.py")):
        src = path.read_text()
        tree = ast.parse(src)
        assert not [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "path"
                    and isinstance(n.value, ast.Name) and n.value.id == "sys"], path.name
        assert "PYTHONPATH" not in src, path.name
        if path.name in BENCHMARKS:
            assert "bench_metadata(" in src, path.name
        if path.name != "bench_meta.py":
            assert not [w for w in ("datetime", "/proc/cpuinfo", "lscpu", "platform.processor", "platform.node")
                        if w in src], path.name


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="measures glibc's allocator")
def test_malloc_holes_shows_aligned_holes_not_reused_and_the_fix():
    # docs/PERFORMANCE.md explains our default-allocator peak RSS with this: a freed 64-byte-aligned
    # block's hole is not reused by the next same-sized aligned block (plain malloc reuses it), and a
    # fixed mmap threshold keeps such blocks out of the heap altogether
    def run(env=None):
        r = subprocess.run([sys.executable, str(REPO / "scripts" / "malloc_holes.py"), "--json", "--mb", "8"],
                           capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ, **(env or {})})
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)
    default = run()
    assert max(row["free_mb"] for row in default["malloc"]) < 1.5 * 8
    assert default["posix_memalign"][-1]["free_mb"] > 3 * 8
    fixed = run({"MALLOC_MMAP_THRESHOLD_": str(1 << 20)})
    assert max(row["heap_mb"] for row in fixed["posix_memalign"]) < default["posix_memalign"][-1]["heap_mb"] / 4


def test_bench_compile_product_flops_match_a_hand_count():
    # tiny 64^2/W4 batch 2: the linear layers (x3 for fwd+bwd) and q k^T, attn v (x3), counted by hand;
    # the chunked kernels add one q k^T per block (the backward recompute)
    from argparse import Namespace
    from swinv2_tools.bench_compile import product_flops

    args = Namespace(variant="tiny", img=64, window=4, batch=2)
    C, depths, res = 96, (2, 2, 6, 2), (16, 8, 4, 2)
    linear = attention = qk = 0
    for i, (d, r) in enumerate(zip(depths, res)):
        Ci, T, N = C * 2**i, 2 * r * r, min(4, r) ** 2  # a stage no larger than the window is one window
        linear += d * 2 * T * (3 * Ci * Ci + Ci * Ci + 8 * Ci * Ci)  # qkv, proj, fc1 + fc2
        attention += d * 2 * (2 * T * N * Ci)
        qk += d * 2 * T * N * Ci
        if i < 3:
            linear += 2 * (T // 4) * (4 * Ci) * (2 * Ci)  # patch merging
        # the CPB MLP: (2M-1)^2 offsets through Linear(2, 512) and Linear(512, heads)
        M, heads = min(4, r), (3, 6, 12, 24)[i]
        linear += d * 2 * (2 * M - 1) ** 2 * (2 * 512 + 512 * heads)
    linear += 2 * 2 * (8 * C) * 1000 + 2 * 2 * 3 * 16 * C * 16 * 16  # head, patch-embedding conv
    hand = 3 * (linear + attention)
    assert product_flops(args, "reference") == pytest.approx(hand, rel=0.01)
    assert product_flops(args, "fused") - product_flops(args, "reference") == pytest.approx(qk, rel=1e-9)


def test_bench_compile_product_seconds_count_only_the_products():
    # a pointwise model has no product time; the reference kernel's step has products and no flash
    # attention; the fused kernel's unmasked blocks run CPU flash attention, counted apart
    import swinv2
    from swinv2_tools.bench_compile import product_seconds

    x = torch.randn(2, 3, 32, 32)
    assert product_seconds(torch.nn.GELU(), x.requires_grad_()) == (0.0, 0.0)
    ref = swinv2.create_model("tiny", img_size=32, window_size=4, attention="reference")
    products, flash = product_seconds(ref, x.detach())
    assert products > 0 and flash == 0
    fused = swinv2.create_model("tiny", img_size=32, window_size=4, attention="fused")
    products, flash = product_seconds(fused, x.detach())
    assert products > 0 and flash > 0


@pytest.mark.slow  # compiles a model (about 2 min on 2 cores)
def test_bench_compile_smoke(tmp_path):
    from swinv2_tools.bench_compile import main

    out = tmp_path / "c.json"
    assert main(["--img", "32", "--window", "4", "--batch", "2", "--kernels", "fused", "--precisions", "bf16",
                 "--repeats", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert list(rows) == ["fused bf16 eager", "fused bf16 compiled"]
    assert data["compile_vs_eager"]["fused bf16"]["repeats"] == 1
    for name, r in rows.items():
        assert r["median_s"] > 0 and r["floor_s"] > 0 and r["time_over_floor"] > 1, name
        assert r["products_s"] > 0 and r["time_over_products"] > 1, name  # a step is more than its products
        assert r["products_over_floor"] == pytest.approx(r["products_s"] / r["floor_s"]), name
        assert r["speedup_vs_fp32_eager"] is None  # no fp32 eager row to compare with
        assert (r["compile_s"] is not None) == ("compiled" in name)
        assert r["recompiled_after_first_step"] in ((False,) if "compiled" in name else (None,)), name
    assert set(data["meta"]["matmul_gflops"]) == {"bf16"}


# ----------------------------------------------------------------------------- scripts/gpu_check.sh
GPU_CHECK = REPO / "scripts" / "gpu_check.sh"


def _fake_wheels(folder: Path, leave_out: str = "") -> list[str]:
    """Minimal valid wheels named as gpu_check.sh's pinned list (BINARY, SOURCE) wants them."""
    import re
    import zipfile

    text = GPU_CHECK.read_text()
    specs = [s for arr in ("BINARY", "SOURCE") for s in re.search(rf"^{arr}=\(([^)]*)\)", text, re.M)[1].split()]
    names = []
    folder.mkdir()
    for spec in specs:
        name, version = spec.split("==")
        if name == leave_out:
            continue
        dist = name.replace("-", "_")
        tag = "cp312-cp312-manylinux2014_x86_64" if name == "pydantic-core" else "py3-none-any"
        info = f"{dist}-{version}.dist-info"
        with zipfile.ZipFile(folder / f"{dist}-{version}-{tag}.whl", "w") as z:
            z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
            z.writestr(f"{info}/WHEEL", f"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: {tag}\n")
            z.writestr(f"{info}/RECORD", "")
        names.append(f"{dist}-{version}-{tag}.whl")
    return names


def test_gpu_check_dry_run_refuses_without_its_wheels(tmp_path):
    _fake_wheels(tmp_path / "w", leave_out="deepspeed")
    r = subprocess.run(["bash", str(GPU_CHECK), "--dry-run", str(tmp_path / "out")], capture_output=True, text=True,
                       env={**os.environ, "GPU_WHEELS": str(tmp_path / "w")}, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "MISSING: one wheel of deepspeed==" in r.stdout and "--prepare-wheels" in r.stdout


@pytest.mark.slow
def test_gpu_check_dry_run_shows_what_travels_and_runs(tmp_path):
    wheels = _fake_wheels(tmp_path / "w")
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(GPU_CHECK), "--dry-run", str(out)], capture_output=True, text=True,
                       env={**os.environ, "GPU_WHEELS": str(tmp_path / "w")}, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    for w in wheels:
        assert w in r.stdout
    assert "wheels in all:" in r.stdout and "(limit 64 MiB)" in r.stdout
    assert "the wheels install together" in r.stdout and "swinv2-train run.plan=true ran" in r.stdout
    assert f"-m gpu -v -rs --durations=0 --junitxml {out}/tests.xml tests/test_gpu_" in r.stdout
    assert "scripts/bench_gpu.py --parts peak,throughput --configs base256_w8 --batch 256" in r.stdout
    import re
    assert int(re.search(r"\b(\d+)(?:/\d+)? tests? collected", r.stdout)[1]) >= 12  # the tier, collected here
    assert "plan of default" in (out / "plan.txt").read_text()


def test_bench_gpu_prints_the_table_peak_beside_the_measured_one():
    bench_gpu = runpy.run_path(str(REPO / "scripts" / "bench_gpu.py"))
    row = dict(part="throughput", config="base256_w8", impl="ours", compile=False, batch=256, images_per_s=2000.0,
               achieved_tflops=300.0, mfu=300 / 989, of_measured_peak=300 / 780)
    res = {"meta": {"gpu": "NVIDIA H100 80GB HBM3"}, "rows": [row], "peak_tflops": 780.0, "gpu_table": "H100",
           "table_peak_tflops": 989}
    text = bench_gpu["format_table"](res)
    assert "table peak 989 TFLOP/s (H100, dense bf16), measured bf16 matmul peak 780.0 TFLOP/s" in text
    assert "= 79% of the table" in text and "| 30.3% | 38.5% |" in text
    res.update(gpu_table=None, table_peak_tflops=None)
    assert "not in the GPU table" in bench_gpu["format_table"](res)


def test_bench_compile_verdict_from_paired_repeats():
    from swinv2_tools.bench_compile import compile_verdict, verdict_line

    assert compile_verdict([1.05, 1.10, 1.02, 1.04, 1.03])["verdict"] == "pays"
    assert compile_verdict([1.05, 1.10, 0.55, 1.04, 1.03])["verdict"] == "pays"  # one disturbed round
    assert compile_verdict([0.95, 0.99, 0.97, 0.96, 1.2])["verdict"] == "costs"
    v = compile_verdict([0.95, 1.13, 1.02, 0.99, 1.01])
    assert (v["verdict"], v["median"], v["q1"], v["q3"], v["min"], v["max"]) == ("within noise", 1.01, 0.99, 1.02,
                                                                                0.95, 1.13)
    assert verdict_line(v) == ("compiled 1.01x eager (median of 5 paired repeats; middle half 0.99-1.02x, "
                               "all 0.95-1.13x): within noise")


def test_train_compile_on_a_cpu_says_when_it_does_not_pay(monkeypatch):
    import swinv2_tools.bench_meta as bm
    from swinv2_train.parallelize import COMPILE_ON_CPU, compile_note

    assert compile_note(torch.device("cuda", 0)) is None
    xeon = "Intel(R) Xeon(R) Processor"
    monkeypatch.setattr(bm, "cpu_model", lambda: xeon)
    note = compile_note(torch.device("cpu"))
    assert note.startswith(f"train.compile=true on this CPU ({xeon}) does not pay: compiled")
    assert COMPILE_ON_CPU[xeon] in note and "\n" not in note
    monkeypatch.setattr(bm, "cpu_model", lambda: "AMD EPYC 9R14")  # measured to pay: nothing to say
    assert COMPILE_ON_CPU["AMD EPYC"].endswith(": pays") and compile_note(torch.device("cpu")) is None
    monkeypatch.setattr(bm, "cpu_model", lambda: "Some ARM core")
    assert "not measured (Some ARM core)" in compile_note(torch.device("cpu"))
