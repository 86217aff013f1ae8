"""The feed into the device: uint8 workers, normalisation and erasing on the device, the fast
transforms against the readable reference ones, moving batches ahead, cores for the workers."""
import io
import json
import os
import random
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from swinv2_train.data import DataConfig, TrainStream
from swinv2_train.data.feed import (DeviceFeed, attach_erase, auto_workers, build_feed, check_worker_cores,
                                    erase_boxes)
from swinv2_train.data.pipeline import mix_seed
from swinv2_train.data.shards import expand_shards, iter_shard
from swinv2_train.data.transforms import (EvalTransform, TrainTransform, build_transform, erase_box,
                                          random_erase)
from data_helpers import make_dataset

MEAN, STD = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def photo_jpegs(n, width=500, height=375, quality=90, seed=0):
    """ImageNet-sized photo-like JPEGs (smooth colour fields + fine noise), as the loader benchmark."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        low = Image.fromarray(rng.uniform(0, 255, size=(12, 16, 3)).astype(np.uint8)).resize((width, height), Image.BICUBIC)
        arr = np.asarray(low, dtype=np.float32) + rng.normal(0, 12, (height, width, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


@pytest.fixture(scope="module")
def jpegs():
    return photo_jpegs(12)


def levels(x):
    """A reference (normalised float) image -> its 0..255 pixel levels."""
    return (x * STD + MEAN) * 255


def finish(out):
    """What the device does with one worker output: DeviceFeed on a batch of one."""
    u8, box = out
    images = attach_erase(u8.unsqueeze(0).contiguous(), torch.tensor([box], dtype=torch.int64))
    return build_feed(DataConfig())(images, torch.device("cpu"))[0]


@pytest.mark.parametrize("augment", ["light", "imagenet"])
@pytest.mark.parametrize("size", [192, 224])
def test_fast_transform_same_draws_and_pixels_within_bound(jpegs, augment, size):
    """Same crop boxes (and every other draw: the generators end in the same state); pixels within
    the stated bound of the reference's Pillow resize: crop + flip within 1 level away from the
    2-pixel border (Pillow's filter also reads pixels outside the crop box, torch's clamps at it), at
    most 6 at the border, mean < 0.05. RandAugment's thresholds (Solarize, Posterize, Equalize) can
    turn a 1-level difference into a large one on a few pixels: mean < 0.1 levels, > 2 levels on
    fewer than 0.5% of the pixels."""
    cfg = DataConfig(augment=augment).resolved()
    ref, new = build_transform(cfg, size, True, reference=True), build_transform(cfg, size, True)
    diffs = []
    for i, data in enumerate(jpegs):
        r_ref, r_new = random.Random(i), random.Random(i)
        assert ref.crop_box(500, 375, random.Random(i)) == new.crop_box(500, 375, random.Random(i))
        x, (u8, box) = ref(data, r_ref), new(data, r_new)
        assert r_ref.getstate() == r_new.getstate()  # the same draws, in the same order
        d = (levels(x) - u8.float()).abs()
        if box[2]:  # the reference erased this box: compare the pixels around it
            d[:, box[0]:box[0] + box[2], box[1]:box[1] + box[3]] = 0
        diffs.append(d)
    d = torch.stack(diffs)
    assert d.mean() < (0.05 if augment == "light" else 0.1), d.mean()
    if augment == "light":
        assert d[..., 2:-2, 2:-2].max() <= 1.01 and d.max() <= 6.01, (d[..., 2:-2, 2:-2].max(), d.max())
    else:
        assert (d > 2.01).float().mean() < 0.005


@pytest.mark.parametrize("augment", ["light", "imagenet"])
def test_device_normalisation_and_erasing_equal_the_reference(jpegs, augment):
    """With Pillow's resize (resize="pil"), worker uint8 + DeviceFeed (normalise, then erase with the
    box's seeded noise) gives the reference's float tensors exactly: same seed, same tensors."""
    cfg = DataConfig(augment=augment, reprob=1.0).resolved()  # erase every sample
    ref = build_transform(cfg, 224, True, reference=True)
    kw = dict(scale=(cfg.rrc_scale_min, 1.0), hflip=cfg.hflip, rand_augment=cfg.rand_augment, reprob=1.0)
    new = TrainTransform(224, resize="pil", **kw)
    erased = 0
    for i, data in enumerate(jpegs):
        out = new(data, random.Random(i))
        erased += out[1][2] > 0
        assert torch.equal(finish(out), ref(data, random.Random(i)))
    assert erased >= len(jpegs) // 2


def test_data_resize_pil_gives_the_pixels_of_runs_begun_before(jpegs):
    """data.resize=pil: a run begun before the uint8 feed goes on with the same tensors, bit for bit."""
    for augment, train in (("imagenet", True), ("light", True), ("light", False)):
        cfg = DataConfig(augment=augment, resize="pil").resolved()
        ref, new = build_transform(cfg, 192, train, reference=True), build_transform(cfg, 192, train)
        for i, data in enumerate(jpegs[:6]):
            assert torch.equal(finish(new(data, random.Random(i))), ref(data, random.Random(i)))
    with pytest.raises(ValueError, match="data.resize"):
        DataConfig(resize="opencv").validate()


def test_erase_box_draws_what_random_erase_draws():
    for seed in range(50):
        box = erase_box(0.5, random.Random(seed), 64, 48)
        x = random_erase(torch.zeros(3, 64, 48), 0.5, random.Random(seed))
        if box[2] == 0:
            assert not x.any()
            continue
        top, left, h, w, _ = box
        inside = torch.zeros(64, 48, dtype=torch.bool)
        inside[top:top + h, left:left + w] = True
        assert x[:, inside].ne(0).all() and not x[:, ~inside].any()


def test_draft_decoded_crop_is_the_reference_pixels():
    """A large JPEG decoded in draft mode gives a fractional crop box: the fast transform resizes it
    with Pillow, as the reference does, so the result is the reference's exactly."""
    big = photo_jpegs(1, 1600, 1200)[0]
    cfg = DataConfig(augment="light").resolved()
    ref, new = build_transform(cfg, 192, True, reference=True), build_transform(cfg, 192, True)
    for i in range(6):
        assert torch.equal(finish(new(big, random.Random(i))), ref(big, random.Random(i)))


@pytest.mark.parametrize("size", [192, 224, 384])
def test_fast_eval_transform_within_bound(jpegs, size):
    """Resize (+ centre crop) by torch vs Pillow: within 2 levels away from the border (1 when only
    shrinking; 384 enlarges the 375-pixel side), at most 6 at it, mean < 0.05."""
    cfg = DataConfig(augment="light").resolved()
    ref, new = build_transform(cfg, size, False, reference=True), build_transform(cfg, size, False)
    assert isinstance(new, EvalTransform)
    d = torch.stack([(levels(ref(j)) - new(j)[0].float()).abs() for j in jpegs])
    assert d.mean() < 0.05 and d[..., 2:-2, 2:-2].max() <= (1.01 if size < 375 else 2.01) and d.max() <= 6.01


def test_device_feed_passes_float_through_and_reads_boxes_off_the_images():
    feed = DeviceFeed([0.5] * 3, [0.25] * 3)
    x = torch.full((2, 3, 4, 4), 0.3)
    assert feed(x) is x  # already normalised (an older caller)
    u8 = torch.full((2, 3, 8, 8), 255, dtype=torch.uint8)
    assert erase_boxes(attach_erase(u8, torch.zeros(2, 5, dtype=torch.int64))) is None  # nothing to erase
    boxes = torch.tensor([[0, 0, 0, 0, 0], [1, 2, 3, 4, 77]])
    out = feed(attach_erase(u8, boxes), torch.device("cpu"))
    assert out.dtype == torch.float32 and torch.equal(out[0], torch.full((3, 8, 8), 2.0))
    noise = torch.randn((3, 3, 4), generator=torch.Generator().manual_seed(77))
    assert torch.equal(out[1, :, 1:4, 2:6], noise) and (out[1, :, 0] == 2.0).all()


# ----------------------------------------------------------------------------- the stream
def stream_cfg(pattern, **kw):
    base = dict(train_shards=pattern, num_classes=1000, num_workers=1, shuffle_buffer=0, augment="light",
                reprob=0.5)
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("feed")), n_shards=2, per_shard=12, size=(40, 30), corrupt=(1,))


def test_stream_hands_over_uint8_and_the_device_gets_the_reference_tensors(shards):
    """End to end: the stream's uint8 batches, fed on the device, are the reference transform's
    tensors for the same per-sample seeds: erased boxes exactly, the other pixels close (the tiles
    are pure noise, the worst case for the resize's border: the bounds on photos are tested above)."""
    pattern, _ = shards
    cfg = stream_cfg(pattern, shard_shuffle=False)
    st = TrainStream(cfg, img_size=24, global_batch=4, grad_accum=1, rank=0, world_size=1, seed=3, device=None)
    ref = build_transform(cfg.resolved(), 24, True, reference=True)
    feed, erased = build_feed(cfg), 0
    read = [s for url in expand_shards(pattern) for s in iter_shard(url, Counter())]  # one stream, in order
    samples = {s["__key__"]: (index, s["jpg"]) for index, s in enumerate(read)}  # bad ones take an index too
    for _ in range(st.batches_per_epoch):
        images, _ = st.next_batch()
        assert images.dtype == torch.uint8 and images.element_size() == 1
        boxes = erase_boxes(images)
        x = feed(images, torch.device("cpu"))
        for row, key in enumerate(st.last_keys):
            index, data = samples[key]
            want = ref(data, random.Random(mix_seed("aug", 3, 0, 0, index, key)))
            box = boxes[row].tolist() if boxes is not None else [0] * 5
            if box[2]:
                erased += 1
                sl = (slice(None), slice(box[0], box[0] + box[2]), slice(box[1], box[1] + box[3]))
                assert torch.equal(x[row][sl], want[sl])
            assert (x[row] - want).abs().mean() * 0.229 * 255 < 0.5  # levels; these tiles are pure noise
    assert erased > 0
    st.close()


def test_moving_ahead_keeps_batches_positions_and_counts(shards):
    """The mover's logic on the CPU (device=cpu): the next global batch's chunks are read while the
    current one is handed out, and nothing a step sees changes: batches, keys, positions, counts."""
    pattern, _ = shards
    cfg = stream_cfg(pattern, num_workers=2)
    plain = TrainStream(cfg, img_size=16, global_batch=8, grad_accum=2, rank=0, world_size=1, seed=1, device=None)
    ahead = TrainStream(cfg, img_size=16, global_batch=8, grad_accum=2, rank=0, world_size=1, seed=1,
                        device=torch.device("cpu"))
    for step in range(plain.batches_per_epoch * 2 + 1):  # across an epoch boundary
        for micro in range(2):
            a, b = plain.next_batch(), ahead.next_batch()
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and plain.last_keys == ahead.last_keys
            assert (erase_boxes(a[0]) is None) == (erase_boxes(b[0]) is None)
        assert plain.position() == ahead.position() and plain.bad_samples() == ahead.bad_samples()
        if ahead.batch < ahead.plan.batches_per_epoch:  # the next batch is already read
            assert {b for b, _ in ahead._pending} == {ahead.batch}
    plain.close()
    ahead.close()


# ----------------------------------------------------------------------------- cores
def test_auto_workers_and_the_core_warning(monkeypatch):
    from swinv2_train.data import feed
    monkeypatch.setattr(feed, "_warned", False)  # a stream built earlier in this process gave it already
    assert [auto_workers(c) for c in (1, 2, 3, 4, 5, 8, 9, 16, 17)] == [1, 1, 2, 2, 4, 4, 8, 8, 16]
    assert check_worker_cores(3, cores=4) is None
    msg = check_worker_cores(8, cores=4)
    assert "data.num_workers=8" in msg and "need 9 cores" in msg and "run on 4" in msg
    assert "cpus_per_task" in msg and "data.num_workers=auto (2 here)" in msg
    assert check_worker_cores(8, cores=4) is None  # once per process


def test_num_workers_auto_follows_the_affinity(tmp_path):
    """In a process pinned to one core: auto gives 1 worker; 2 workers warn once, naming the fix."""
    code = ("import os, logging; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
            "logging.basicConfig(level=logging.WARNING)\n"
            "from swinv2_train.data import DataConfig, as_data_config\n"
            "from swinv2_train.data.feed import check_worker_cores\n"
            "print('auto', DataConfig(num_workers='auto').num_workers, as_data_config({'num_workers': 'auto'}).num_workers)\n"
            "check_worker_cores(2); check_worker_cores(2)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "LOCAL_WORLD_SIZE": "1"})
    assert p.returncode == 0, p.stderr
    assert "auto 1 1" in p.stdout
    assert p.stderr.count("need 3 cores, but this rank may run on 1") == 1


def test_num_workers_config_values():
    assert DataConfig(num_workers=3).validate().num_workers == 3  # integer configs, saved runs
    for bad in ("many", -1, 1.5, True):
        with pytest.raises(ValueError, match="data.num_workers"):
            DataConfig(num_workers=bad).validate()


@pytest.mark.gpu  # the GPU tier (python -m pytest -m gpu)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the CPU test above runs the logic)")
def test_cuda_stream_moves_batches_ahead_and_matches_the_host_path(shards):
    pattern, _ = shards
    cfg = stream_cfg(pattern, num_workers=2, pin_memory=True)
    host = TrainStream(cfg, img_size=16, global_batch=8, grad_accum=2, rank=0, world_size=1, seed=1, device=None)
    cuda = TrainStream(cfg, img_size=16, global_batch=8, grad_accum=2, rank=0, world_size=1, seed=1)  # "auto"
    feed = build_feed(cfg)
    for _ in range(host.batches_per_epoch * 2):
        for micro in range(2):
            a, b = host.next_batch(), cuda.next_batch()
            assert b[0].is_cuda and torch.equal(a[0], b[0].cpu()) and torch.equal(a[1], b[1])
            assert torch.equal(feed(a[0], torch.device("cpu")), feed(b[0]).cpu())  # erasing included
        assert host.position() == cuda.position()
    host.close()
    cuda.close()


def test_bench_loader_quick_reports_ceilings_ratios_and_bytes(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, "-m", "swinv2_tools.bench_loader", "--quick", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    assert res["meta"]["cpu_model"] and res["meta"]["image_size"] == "500x375" and res["meta"]["command"]
    row = res["rows"][0]
    for key in ("decode", "decode+resize old", "decode+resize new", "light old", "light new", "imagenet old",
                "imagenet new", "light new/old", "imagenet new/old"):
        assert row[key] > 0, key
    assert sorted((r["augment"], r["workers"]) for r in res["loader"]) == [
        ("imagenet", 1), ("imagenet", 2), ("light", 1), ("light", 2)]
    assert all(r["bytes_per_value"] == 1 and r["old_bytes_per_value"] == 4 for r in res["loader"])
    assert "AMD" in p.stdout or res["meta"]["cpu_model"] in p.stdout


def test_num_workers_auto_through_the_trainer_config():
    """`swinv2-train data.num_workers=auto`: the run spec holds this process's count (what the
    trainer's thread count and the stream use); the saved tree keeps auto; a bad value is one
    ConfigError naming the key."""
    from hydra import compose, initialize_config_dir

    from swinv2_train.config import ConfigError
    from swinv2_train.spec import resolve_spec
    from test_config import CONFIGS

    def spec(value):
        with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
            return resolve_spec(compose("train", overrides=[f"data.num_workers={value}"]), 1, resolve_data=False)
    s = spec("auto")
    assert s.data.num_workers == auto_workers() and s.config["data"]["num_workers"] == "auto"
    assert spec(3).data.num_workers == 3
    with pytest.raises(ConfigError, match="data.num_workers='many'"):
        spec("many")
