"""train.cpu_malloc: the trainer's CPU allocator policy (swinv2_train.allocator)."""
import json
import os
import platform
import subprocess
import sys

import pytest

from swinv2_train import allocator
from swinv2_train.allocator import RETAIN_THRESHOLDS, apply_cpu_malloc_policy, preloaded_allocator

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")


@pytest.fixture
def calls(monkeypatch):
    """Record set_glibc_thresholds instead of changing this test process's allocator."""
    seen = []
    monkeypatch.setattr(allocator, "set_glibc_thresholds", lambda *a: seen.append(a) or True)
    monkeypatch.setattr(allocator, "preloaded_allocator", lambda: None)
    for name in allocator.USER_ENV:
        monkeypatch.delenv(name, raising=False)
    return seen


def test_auto_sets_the_threshold_at_high_resolution_and_says_so(calls, caplog):
    caplog.set_level("INFO", logger="swinv2_train.allocator")
    msg = apply_cpu_malloc_policy("auto", 1536)
    assert calls == [(1 << 20,)]
    assert "1 MiB" in msg and "1536^2" in msg and "train.cpu_malloc=off" in msg
    assert any("CPU allocator:" in r.getMessage() for r in caplog.records)


def test_auto_retains_freed_memory_below_1024_and_on_or_retain_force_either(calls):
    msg = apply_cpu_malloc_policy("auto", 256)
    assert calls == [RETAIN_THRESHOLDS] and "256^2" in msg and "train.cpu_malloc=on" in msg
    apply_cpu_malloc_policy("on", 256)
    apply_cpu_malloc_policy("retain", 1536)
    assert calls == [RETAIN_THRESHOLDS, (1 << 20,), RETAIN_THRESHOLDS]


def test_retain_on_an_older_glibc_falls_back_to_its_32_mib_ceiling(calls, monkeypatch):
    # glibc 2.33 and before (RHEL 8, Ubuntu 20.04) refuses mmap thresholds above 32 MiB and then sets nothing;
    # retain must still set the largest it accepts, with the same trim threshold, and say which
    def old_glibc(mmap_bytes, trim_bytes=None):
        calls.append((mmap_bytes, trim_bytes))
        return mmap_bytes <= 32 << 20
    monkeypatch.setattr(allocator, "set_glibc_thresholds", old_glibc)
    msg = apply_cpu_malloc_policy("auto", 512)
    assert calls == [RETAIN_THRESHOLDS, (32 << 20, RETAIN_THRESHOLDS[1])]
    assert "up to 32 MiB" in msg and "mmap threshold 32 MiB, trim threshold 1 GiB" in msg
    monkeypatch.setattr(allocator, "set_glibc_thresholds", lambda *a: False)  # not glibc at all
    assert "nothing set" in apply_cpu_malloc_policy("retain", 512)


def test_off_sets_nothing(calls):
    assert "off" in apply_cpu_malloc_policy("off", 1536)
    assert calls == []


def test_preloaded_jemalloc_or_env_threshold_wins(calls, monkeypatch):
    monkeypatch.setattr(allocator, "preloaded_allocator", lambda: "jemalloc")
    assert "jemalloc is preloaded" in apply_cpu_malloc_policy("auto", 1536)
    monkeypatch.setattr(allocator, "preloaded_allocator", lambda: None)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "4096")
    assert "MALLOC_MMAP_THRESHOLD_=4096" in apply_cpu_malloc_policy("on", 256)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert "MALLOC_TRIM_THRESHOLD_=0" in apply_cpu_malloc_policy("auto", 256)
    assert calls == []


def test_unknown_policy_names_the_key():
    with pytest.raises(ValueError, match="train.cpu_malloc"):
        apply_cpu_malloc_policy("jemalloc", 256)


def test_preloaded_allocator_reads_the_maps(tmp_path, monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    maps = tmp_path / "maps"
    maps.write_text("7f00 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert preloaded_allocator(str(maps)) is None
    maps.write_text("7f00 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4\n")
    assert preloaded_allocator(str(maps)) == "tcmalloc"
    monkeypatch.setenv("LD_PRELOAD", "/opt/libjemalloc.so.2")
    assert preloaded_allocator(str(tmp_path / "missing")) == "jemalloc"


# the malloc_holes pattern with torch tensors: two 28 MB temporaries per "step", one freed, a small
# tensor kept alive between them; at the end only the small ones stay alive
_CHILD = r"""
import json, sys, torch
from swinv2_train.allocator import apply_cpu_malloc_policy, set_glibc_thresholds
def rss_mb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024
out = {}
if sys.argv[1] == "auto":
    out["msg"] = apply_cpu_malloc_policy("auto", 1536)
    out["mallopt"] = set_glibc_thresholds(1 << 20)
n = 7_000_000
t = torch.ones(n); del t  # a freed mmap'ed block raises glibc's dynamic threshold to 28 MB
base, live = rss_mb(), []
for _ in range(12):
    a, b = torch.ones(n), torch.ones(n)
    live.append(torch.ones(1024)); del a; live.append(b)
live = [x for x in live if x.numel() == 1024]
out["retained_mb"] = rss_mb() - base
print(json.dumps(out))
"""


def _run_child(code, policy):
    env = {k: v for k, v in os.environ.items() if k not in (*allocator.USER_ENV, "LD_PRELOAD")}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", code, policy], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


@glibc
def test_policy_returns_freed_tensors_to_the_os():
    # 12 x 28 MB were live at the peak and freed: without the policy glibc keeps them (measured:
    # +641 MB, the heap's holes), with it RSS comes back to the baseline (measured: +27 MB)
    default, fixed = _run_child(_CHILD, "off"), _run_child(_CHILD, "auto")
    assert fixed["mallopt"] is True and "1 MiB" in fixed["msg"]
    assert default["retained_mb"] > 250, default
    assert fixed["retained_mb"] < 60, fixed


# training steps of a small SwinV2 (64^2, batch 8, fp32): minor page faults of each step
_STEPS_CHILD = r"""
import json, resource, sys, torch
from swinv2_train.allocator import apply_cpu_malloc_policy
out = {"msg": apply_cpu_malloc_policy(sys.argv[1], 64)}
assert sys.argv[1] != "auto" or "keeps freed blocks" in out["msg"], out
import swinv2
torch.manual_seed(0)
model, x = swinv2.create_model("tiny", img_size=64, window_size=8), torch.randn(8, 3, 64, 64)
out["faults"] = []
for _ in range(7):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model(x).logsumexp(-1).mean().backward()
    model.zero_grad(set_to_none=True)
    out["faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(out))
"""


@glibc
def test_retain_reuses_freed_memory_without_page_faults():
    # glibc's dynamic thresholds unmap or trim freed activations, so most steps fault their pages in
    # again (measured: 13-20 k faults a step, now and then one with none); auto below 1024^2 (retain)
    # keeps them in the heap (measured: 0-800 a step from the fourth step on)
    default, retained = (sum(_run_child(_STEPS_CHILD, p)["faults"][3:]) for p in ("off", "auto"))
    assert default > 20_000 and retained < min(4000, default / 10), (default, retained)


def _validate(overrides):
    from hydra import compose, initialize_config_dir

    import swinv2_train.config as C
    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    with initialize_config_dir(config_dir=configs, version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    return C.validate(cfg, world_size=1)


def test_config_key_default_auto_and_bad_value_names_the_key():
    import swinv2_train.config as C
    assert _validate([]).train.cpu_malloc == "auto"
    assert _validate(["train.cpu_malloc=off"]).train.cpu_malloc == "off"
    with pytest.raises(C.ConfigError, match=r"^train\.cpu_malloc"):
        _validate(["train.cpu_malloc=tcmalloc"])
