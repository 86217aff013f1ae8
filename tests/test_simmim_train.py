"""task=simmim in the trainer: the data stream draws per-sample masks (replayed on resume, no labels
needed), reconstruction pictures, and the slow end-to-end chain as users run it: SimMIM
pre-training on the synthetic set (the masked L1 falls), export of the official SimMIM state dict,
bit-identical resume, then a fine-tune from the export."""
import glob
import os

import pytest
import torch

from data_helpers import jpeg_bytes, write_tar
from swinv2_train.data import DataConfig, TrainStream
from swinv2_train.data.masking import MaskGenerator, sample_mask_rng


def unlabeled_shards(root, n_shards=2, per_shard=8):
    """Shards with images only (no .cls): what SimMIM pre-training may read."""
    os.makedirs(root, exist_ok=True)
    for sh in range(n_shards):
        write_tar(os.path.join(root, f"train-{sh:04d}.tar"),
                  [{"__key__": f"u{sh}_{i:03d}", "jpg": jpeg_bytes(sh * 100 + i, (32, 32))} for i in range(per_shard)])
    return os.path.join(root, f"train-{{0000..{n_shards - 1:04d}}}.tar"), n_shards * per_shard


def _stream(pattern, n, gen, position=None):
    cfg = DataConfig(train_shards=pattern, train_samples=n, num_classes=1, num_workers=0, augment="light",
                     shuffle_buffer=4, canonical_streams=2)
    return TrainStream(cfg, img_size=32, global_batch=4, grad_accum=1, rank=0, world_size=1, seed=3,
                       position=position, masks=gen)


def test_stream_draws_per_sample_masks_from_unlabeled_shards_and_replays_them(tmp_path):
    pattern, n = unlabeled_shards(str(tmp_path / "u"))
    gen = MaskGenerator(32, 8, 4, 0.6)
    stream = _stream(pattern, n, gen)
    images, masks = stream.next_batch()
    assert images.shape == (4, 3, 32, 32) and masks.shape == (4, 8, 8) and masks.dtype == torch.bool
    assert (masks.flatten(1).sum(1) == 10 * 4).all()  # ceil(16 x 0.6) = 10 cells of 2x2 tokens
    # stream s's samples 0 and 1 are chunk 0 (2 per stream); their masks are seeded by (seed, epoch, s, index)
    expected = torch.stack([gen(sample_mask_rng(3, 0, s, i)) for s in (0, 1) for i in (0, 1)])
    assert torch.equal(masks, expected)
    later = [stream.next_batch()[1] for _ in range(2)]
    position = stream.position()
    after = stream.next_batch()
    stream.close()
    resumed = _stream(pattern, n, gen, position)  # a resumed stream replays the same masks
    assert torch.equal(resumed.next_batch()[1], after[1]) and not torch.equal(later[0], later[1])
    resumed.close()


def test_reconstruction_grid_png(tmp_path):
    from types import SimpleNamespace

    from PIL import Image

    from swinv2_train.metrics import NullLogger
    from swinv2_train.tasks.simmim import SimMIMTask

    class Logger(NullLogger):
        images = []

        def log_image(self, name, image, step):
            self.images.append((name, image.shape, step))

    spec = SimpleNamespace(model=_tiny_config(), run=SimpleNamespace(seed=0), run_dir=str(tmp_path),
                           task={"name": "simmim", "mask_patch_size": 8, "recon_every": 2,
                                 "norm_target": {"enable": True, "window": 7}})
    env = SimpleNamespace(device=torch.device("cpu"), rank=0, world_size=1)
    task, model = SimMIMTask(spec, env), SimMIMTask.build_model(spec)
    gen = MaskGenerator(32, 8, 4, 0.6)
    task.batch(torch.randn(6, 3, 32, 32), torch.stack([gen(i) for i in range(6)]))
    logger = Logger()
    assert task.after_step(1, model, logger) is None  # not due
    path = task.after_step(2, model, logger)
    picture = Image.open(path)
    assert path.endswith("step_00000002.png") and picture.size == (4 * 32, 4 * 32) and picture.mode == "RGB"
    assert logger.images == [("simmim/reconstruction", (128, 128, 3), 2)]
    assert model.training


def _tiny_config():
    from swinv2.config import SwinV2Config
    return SwinV2Config.from_variant("tiny", img_size=32, window_size=4, embed_dim=16, depths=(1, 1, 1, 1),
                                     num_heads=(1, 2, 2, 4), num_classes=0)


# ----------------------------------------------------------------------------- end to end (slow)
SIMMIM = ["experiment=simmim_default", "train.progress=lines", "train.log_every=1", "logger.wandb.enabled=false"]


@pytest.mark.slow
def test_simmim_pretrain_export_and_finetune(tmp_path):
    from test_train import metrics, train

    import swinv2
    run = str(tmp_path / "pt")
    train([*SIMMIM, f"run.dir={run}", "train.max_steps=120", "train.eval_every=0", "train.ckpt_every=0",
           "task.recon_every=60"], cwd=tmp_path)
    losses = [r["train/loss"] for r in metrics(run) if "train/loss" in r]
    assert len(losses) == 120
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)  # the masked L1 falls substantially
    assert all(r["train/mask_ratio"] == pytest.approx(0.625) for r in metrics(run) if "train/mask_ratio" in r)
    # the official SimMIM state dict: strict load into swinv2.SimMIM of the same encoder
    export = os.path.join(run, "model_simmim.pth")
    state = torch.load(export, map_location="cpu", weights_only=True)["model"]
    from omegaconf import OmegaConf

    from swinv2_train.config import model_config
    reference = swinv2.SimMIM(model_config(OmegaConf.load(os.path.join(run, "config.yaml")).model, 0))
    assert set(state) == set(reference.state_dict()) and "encoder.mask_token" in state and "decoder.0.weight" in state
    reference.load_state_dict(state, strict=True)
    assert not os.path.exists(os.path.join(run, "model_official.pth"))
    assert sorted(os.listdir(os.path.join(run, "reconstructions"))) == ["step_00000060.png", "step_00000120.png"]
    events = glob.glob(os.path.join(run, "tensorboard", "events.*"))
    assert any(b"simmim/reconstruction" in open(e, "rb").read() for e in events)
    # the export CLI picks the SimMIM writer from the keys
    again = str(tmp_path / "again.pth")
    train(["export", run, again], cmd=("python", "-m", "swinv2_train.checkpoint"), cwd=tmp_path)
    assert set(torch.load(again, map_location="cpu", weights_only=True)["model"]) == set(state)
    # fine-tune the classifier from it: the log names the dropped SimMIM keys
    ft = str(tmp_path / "ft")
    p = train([f"model.pretrained={export}", "optim.layer_decay=0.75", f"run.dir={ft}", "train.max_steps=20",
               "train.eval_every=0", "train.ckpt_every=0", "logger.wandb.enabled=false", "train.progress=lines"],
              cwd=tmp_path)
    log = p.stdout + p.stderr + open(os.path.join(ft, "train.log")).read()
    assert "SimMIM-only keys" in log and "mask_token" in log
    assert os.path.exists(os.path.join(ft, "model_official.pth"))


@pytest.mark.slow
def test_simmim_resume_is_bit_identical(tmp_path):
    from test_train import module_weights, train
    common = [*SIMMIM, "train.batch_size=16", "train.max_steps=6", "train.eval_every=0", "train.ckpt_every=0",
              "train.probe_every=0", "task.recon_every=0"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train([*common, f"run.dir={a}"], cwd=tmp_path)
    train([*common, f"run.dir={b}", "train.stop_at_step=3"], cwd=tmp_path)
    train([*common, f"run.dir={b}"], cwd=tmp_path)
    wa = module_weights(os.path.join(a, "checkpoints", "step_00000006"))
    wb = module_weights(os.path.join(b, "checkpoints", "step_00000006"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
