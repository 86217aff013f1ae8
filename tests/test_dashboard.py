"""The W&B run and TensorBoard of real runs (`swinv2-train`, W&B offline), checked from the offline
run's own records (tests/wandb_records.py reads the .wandb log): the name, group and tags, the
config, the history keys with ETA and TFLOP/s, val metrics against samples seen, the amplitude
figure at each evaluation and at the end, SimMIM's final reconstruction, the summary's final and
best val metrics, and a resumed run continuing the same W&B run."""
import glob
import os

import pytest

from test_train import metrics, train
from wandb_records import offline_runs, read_run

pytestmark = pytest.mark.slow


def tensorboard_images(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    return {tag: [e.step for e in acc.Images(tag)] for tag in acc.Tags()["images"]}


def test_classification_run_and_its_resume_on_the_dashboard(tmp_path):
    run_dir = str(tmp_path / "run")
    common = ["run.name=dash", "logger.wandb.tags=[mine]", "train.eval_every=4", "train.probe_every=4",
              "train.log_every=2", "train.ckpt_every=0", f"run.dir={run_dir}", "train.progress=lines"]
    train([*common, "train.max_steps=8"], cwd=tmp_path)
    (first,) = offline_runs(run_dir)
    run = read_run(first)
    assert (run.name, run.group) == ("dash", "default")  # run.name; the experiment (experiment=default)
    assert run.tags == ["mine", "toy", "classification", "32px"]
    assert run.config["run"]["name"] == "dash" and run.config["model"]["variant"] == "toy"
    keys = set().union(*run.history)
    assert {"train/loss", "train/eta_s", "train/elapsed_s", "train/tflops", "train/images_per_s",
            "train/data_wait_frac", "train/peak_mem_mb", "val/top1", "amplitude/00/rms"} <= keys
    assert "train/mfu_pct" not in keys  # a CPU without train.peak_tflops
    assert run.metrics["val/*"] == "train/samples_seen"  # val metrics plot against samples seen too
    assert all("train/samples_seen" in row for row in run.history if "val/top1" in row)
    images = run.images("amplitudes")
    assert [im["_step"] for im in images] == [4, 8] and all(im["path"] in run.files for im in images)
    assert all(os.path.isfile(os.path.join(os.path.dirname(first), "files", im["path"])) for im in images)
    vals = [r["val/top1"] for r in metrics(run_dir) if "val/top1" in r]
    assert run.summary["val/top1"] == vals[-1] and run.summary["val/top1_best"] == max(vals)
    assert tensorboard_images(run_dir) == {"amplitudes": [4, 8]}  # TensorBoard gets the same images

    train([*common, "train.max_steps=10"], cwd=tmp_path)  # resumed from step 8: the same W&B run
    runs = offline_runs(run_dir)
    wandb_id = open(os.path.join(run_dir, "wandb_id")).read().strip()
    assert len(runs) == 2 and all(os.path.basename(r) == f"run-{wandb_id}.wandb" for r in runs)
    resumed = read_run(runs[1])
    assert resumed.name == "dash" and min(row["_step"] for row in resumed.history) == 10  # logged: 10
    vals = [r["val/top1"] for r in metrics(run_dir) if "val/top1" in r]
    assert resumed.summary["val/top1_best"] == max(vals)  # the best of both parts (checkpoint's best_val)


def test_simmim_run_of_30_steps_has_a_final_reconstruction(tmp_path):
    run_dir = str(tmp_path / "simmim")
    train(["experiment=simmim_default", "train.max_steps=30", "train.eval_every=0", "train.ckpt_every=0",
           "train.log_every=10", f"run.dir={run_dir}", "train.progress=lines"], cwd=tmp_path)
    (path,) = offline_runs(run_dir)
    run = read_run(path)
    assert (run.name, run.group) == ("simmim_default", "simmim_default")
    assert {"simmim", "32px"} <= set(run.tags)
    assert [im["_step"] for im in run.images("simmim/reconstruction")] == [30]  # task.recon_every is 1000
    assert [im["_step"] for im in run.images("amplitudes")] == [30]
    assert sorted(os.listdir(os.path.join(run_dir, "reconstructions"))) == ["step_00000030.png"]
    final = [r for r in metrics(run_dir) if "val/loss" in r][-1]["val/loss"]
    assert run.summary["val/loss"] == final and run.summary["val/loss_best"] == final
    assert tensorboard_images(run_dir) == {"amplitudes": [30], "simmim/reconstruction": [30]}
    assert glob.glob(os.path.join(os.path.dirname(path), "files", "media", "images", "simmim", "*.png"))
