"""swinv2-make-shards on a miniature ImageNet-21K release (tests/imagenet_archive.py): a gzipped tar of
12 per-class tars, 300 files with every bad kind mixed in. Prepare, workers, parts and merge give the
same shards byte for byte; shards mix classes; --classes and --holdout; the bad kinds counted exactly;
resume and refusals; training on the result (slow)."""
import fcntl
import glob
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
from PIL import Image

from imagenet_archive import BAD_FILES, class_images, synset, write_archive
from swinv2_tools.make_shards import main as make_shards

CLASSES, PER_CLASS, HOLDOUT = 12, 25, 2
OPTS = ["--samples-per-shard", "40", "--holdout", str(HOLDOUT), "--no-progress"]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The gzipped archive, and one full single-process run on it (the reference shards)."""
    d = tmp_path_factory.mktemp("release")
    archive = str(d / "winter21_whole.tar.gz")
    kinds = write_archive(archive, CLASSES, PER_CLASS)
    out = str(d / "w1")
    assert make_shards([archive, out, "--workers", "1", *OPTS]) == 0
    return {"dir": d, "archive": archive, "kinds": kinds, "out": out}


def shard_bytes(out):
    return {os.path.basename(p): open(p, "rb").read() for p in sorted(glob.glob(os.path.join(out, "*.tar")))}


def samples(path):
    """[(key, label, jpg bytes, meta)] of one shard, in order."""
    got = {}
    with tarfile.open(path) as tf:
        for m in tf:
            key, ext = m.name.split(".", 1)
            got.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return [(k, int(v["cls"]), v["jpg"], json.loads(v["json"])) for k, v in got.items()]


def info(out):
    with open(os.path.join(out, "_info.json")) as f:
        return json.load(f)


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "swinv2_tools.make_shards", *args], capture_output=True,
                          text=True, timeout=120, **kw)


# ----------------------------------------------------------------------------- the same shards
def test_workers_and_parts_give_the_same_shards(release, tmp_path):
    reference = shard_bytes(release["out"])
    assert len(reference) == 7 + 1  # planned: 300 - 24 held out = 276 train -> 7 shards of 40; 24 validation
    # two workers, inputs prepared once into a folder of their own
    prepared = str(tmp_path / "prepared")
    out2 = str(tmp_path / "w2")
    assert make_shards([release["archive"], out2, "--prepare", "--prepared", prepared, *OPTS]) == 0
    assert sorted(os.listdir(prepared)) == sorted([f"{synset(c)}.tar" for c in range(CLASSES)]
                                                  + ["index.jsonl.gz", "prepared.json"])
    assert make_shards([release["archive"], out2, "--workers", "2", "--prepared", prepared, *OPTS]) == 0
    assert shard_bytes(out2) == reference
    # two parts started together, neither prepared: one prepares under the lock, then merge
    out3 = str(tmp_path / "parts")
    procs = [subprocess.Popen([sys.executable, "-m", "swinv2_tools.make_shards", release["archive"], out3,
                               "--part", f"{i}/2", *OPTS], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in (1, 2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert not os.path.exists(os.path.join(out3, "_info.json"))  # written by the merge only
    r = cli(out3, "--merge")
    assert r.returncode == 0, r.stderr
    assert shard_bytes(out3) == reference
    for name in ("classes.json", "_skipped_train.tsv", "_skipped_validation.tsv"):
        assert open(os.path.join(out3, name), "rb").read() == open(os.path.join(release["out"], name), "rb").read()
    assert {**info(out3), "name": "w1"} == info(release["out"])  # the name is the folder's


def test_a_part_waits_for_the_one_preparing(release, tmp_path):
    """While another process holds OUT's lock (preparing), a part waits, then uses that work."""
    out = tmp_path / "out"
    (out / "_make_shards").mkdir(parents=True)
    fd = os.open(out / "_make_shards" / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.lockf(fd, fcntl.LOCK_EX)  # this process plays the part that prepares
    part = subprocess.Popen([sys.executable, "-m", "swinv2_tools.make_shards", release["archive"], str(out),
                             "--part", "1/2", *OPTS], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = part.stderr.readline()
        assert first.startswith(f"waiting for another process preparing {out}"), first
        assert part.poll() is None and not (out / "_prepared").exists()
    finally:
        os.close(fd)  # releases the lock
    _, err = part.communicate(timeout=120)
    assert part.returncode == 0 and "part 1/2 done" in err, err


def test_uncompressed_archive_is_read_in_place(release, tmp_path):
    """fall11_whole.tar / ILSVRC2012_img_train.tar: indexed where the images lie, nothing extracted;
    the same images give the same shards as from the gzipped release."""
    archive = str(tmp_path / "fall11_whole.tar")
    write_archive(archive, CLASSES, PER_CLASS, gz=False)
    out = str(tmp_path / "out")
    assert make_shards([archive, out, *OPTS]) == 0
    assert sorted(os.listdir(os.path.join(out, "_prepared"))) == ["index.jsonl.gz", "prepared.json"]
    assert shard_bytes(out) == shard_bytes(release["out"])


# ----------------------------------------------------------------------------- what the shards hold
def test_shards_mix_classes_and_holdout_is_by_key(release):
    out, sp = release["out"], info(release["out"])["splits"]
    good = PER_CLASS * CLASSES - sum(v for k, v in release["kinds"].items() if k in ("truncated", "empty", "undecodable"))
    assert sp["train"]["num_samples"] + sp["validation"]["num_samples"] == good
    by_split = {}
    for split in ("train", "validation"):
        rows = []
        for name, n in zip(sp[split]["filenames"], sp[split]["shard_lengths"]):
            got = samples(os.path.join(out, name))
            assert len(got) == n
            if split == "train":
                assert len({label for _, label, _, _ in got}) >= 6, name  # every shard mixes classes
            rows += got
        by_split[split] = rows
    # --holdout 2: per class the 2 keys with the smallest sha256 (bad ones then skipped)
    classes, _ = class_images(CLASSES, PER_CLASS)
    expected = set()
    for cls, images in classes.items():
        keys = sorted((n.split(".")[0] for n, _ in images), key=lambda k: hashlib.sha256(k.encode()).digest())
        expected |= set(keys[:HOLDOUT])
    val_keys = {k for k, _, _, _ in by_split["validation"]}
    skipped = {line.split("\t")[1].split("/")[1].split(".")[0]
               for line in open(os.path.join(out, "_skipped_validation.tsv")).read().splitlines()[1:]}
    assert val_keys | skipped == expected and not val_keys & {k for k, _, _, _ in by_split["train"]}
    # labels: the sorted synsets; the meta names the source file
    assert json.load(open(os.path.join(out, "classes.json"))) == [synset(c) for c in range(CLASSES)]
    for key, label, _, meta in by_split["train"][:20]:
        assert meta["class_name"] == synset(label) and meta["filename"] == f"{synset(label)}/{key}.JPEG"


def test_bad_files_are_counted_exactly_and_listed(release):
    out = release["out"]
    ms = info(out)["make_shards"]
    counted = {k: ms["train"]["counts"][k] + ms["validation"]["counts"][k] for k in ms["train"]["counts"]}
    assert counted == {k: release["kinds"].get(k, 0) for k in counted}
    listed = [line.split("\t") for split in ("train", "validation")
              for line in open(os.path.join(out, f"_skipped_{split}.tsv")).read().splitlines()[1:]]
    expected = {(kind, f"{synset(c)}/{synset(c)}_{1000 + n}.JPEG") for (c, n), kind in BAD_FILES.items()
                if kind in ("truncated", "empty", "undecodable")}
    assert {(kind, name) for kind, name, _ in listed} == expected
    # kept JPEGs are the source bytes; re-encoded ones are RGB JPEGs
    classes, _ = class_images(CLASSES, PER_CLASS)
    source = {name.split(".")[0]: data for images in classes.values() for name, data in images}
    all_samples = [s for p in glob.glob(os.path.join(out, "*.tar")) for s in samples(p)]
    reencoded = {f"{synset(c)}_{1000 + n}" for (c, n), kind in BAD_FILES.items() if kind.startswith("reencoded")}
    for key, _, jpg, _ in all_samples:
        if key in reencoded:
            with Image.open(io.BytesIO(jpg)) as img:
                assert (img.format, img.mode) == ("JPEG", "RGB")
        else:
            assert jpg == source[key]


def test_classes_file_pins_the_label_order(release, tmp_path):
    """The fall11 label space on winter21 images: labels index the given list; classes without images
    are reported; a class missing from the list is an error naming it."""
    pinned = [synset(c) for c in range(CLASSES + 3)][::-1]  # 3 more classes, reversed order
    classes_file = tmp_path / "fall11_synsets.txt"
    classes_file.write_text("\n".join(pinned) + "\n")
    out = str(tmp_path / "out")
    r = cli(release["archive"], out, "--classes", str(classes_file), "--prepared",
            os.path.join(release["out"], "_prepared"), *OPTS)
    assert r.returncode == 0, r.stderr
    assert "3 classes of the class list have no images" in r.stderr
    assert json.load(open(os.path.join(out, "classes.json"))) == pinned
    assert info(out)["num_classes"] == CLASSES + 3
    for _, label, _, meta in samples(os.path.join(out, "train-000000.tar")):
        assert pinned[label] == meta["class_name"] == meta["filename"].split("/")[0]
    assert info(out)["make_shards"]["train"]["classes_without_images"] == pinned[:3]
    short = tmp_path / "short.txt"
    short.write_text("\n".join(synset(c) for c in range(CLASSES - 1)) + "\n")
    r = cli(release["archive"], str(tmp_path / "out2"), "--classes", str(short), *OPTS)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"class '{synset(CLASSES - 1)}'" in r.stderr and "--classes" in r.stderr


# ----------------------------------------------------------------------------- resume, refusals
def test_rerun_resumes_and_a_changed_input_is_refused(release, tmp_path):
    archive = str(tmp_path / "a.tar.gz")
    write_archive(archive, 4, 10)
    out = str(tmp_path / "out")
    args = [archive, out, "--samples-per-shard", "10", "--no-progress"]
    assert make_shards(args) == 0
    shards = sorted(glob.glob(os.path.join(out, "train-*.tar")))
    before = {p: os.stat(p).st_ino for p in shards}
    last = open(shards[-1], "rb").read()
    os.remove(shards[-1])
    with open(shards[0], "ab") as f:  # a damaged shard: not the recorded size
        f.write(b"x")
    assert make_shards(args) == 0
    assert os.stat(shards[1]).st_ino == before[shards[1]]  # done shards kept
    assert open(shards[-1], "rb").read() == last and os.stat(shards[0]).st_ino != before[shards[0]]
    shutil.rmtree(os.path.join(out, "_prepared"))  # deleted after the merge; then a shard is lost
    os.remove(shards[-1])
    assert make_shards(args) == 0  # the inner tars come back, not 10 "unreadable" images
    assert open(shards[-1], "rb").read() == last
    r = cli(*args[:2], "--samples-per-shard", "5")
    assert r.returncode == 1 and "--samples-per-shard 10 -> 5" in r.stderr and "--overwrite" in r.stderr
    os.utime(archive, ns=(1, 1))  # another copy of the archive
    r = cli(*args)
    assert r.returncode == 1 and "the source changed" in r.stderr and "Traceback" not in r.stderr
    assert make_shards([*args[:2], "--samples-per-shard", "5", "--overwrite", "--no-progress"]) == 0
    assert len(glob.glob(os.path.join(out, "train-*.tar"))) == 8 == len(info(out)["splits"]["train"]["filenames"])


def test_merge_names_the_missing_parts(release, tmp_path):
    out = str(tmp_path / "out")
    prepared = os.path.join(release["out"], "_prepared")
    assert make_shards([release["archive"], out, "--part", "1/3", "--prepared", prepared, *OPTS]) == 0
    r = cli(out, "--merge")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "missing parts: 2/3, 3/3" in r.stderr, r.stderr
    assert make_shards([release["archive"], out, "--part", "3/3", "--prepared", prepared, *OPTS]) == 0
    assert "missing parts: 2/3." in cli(out, "--merge").stderr
    r = cli(release["archive"], out, "--part", "4/3")
    assert r.returncode == 1 and "1 <= i <= n" in r.stderr


def _damage_member_header(path, index: int, inner: bool = False) -> str:
    """Overwrite the header of the outer archive's member `index` (or of the first member of that
    member's inner tar) with bytes that are no tar header; returns the member's name."""
    with tarfile.open(path) as tf:
        m = tf.getmembers()[index]
    data = bytearray(open(path, "rb").read())
    at = m.offset_data if inner else m.offset
    data[at:at + 100] = b"\x07" * 100
    open(path, "wb").write(bytes(data))
    return m.name


def test_damaged_inner_tar_keeps_the_rest(tmp_path):
    """One damaged class tar of 19,000 does not stop the run: a warning names it, the others are used."""
    archive = str(tmp_path / "fall11_whole.tar")
    write_archive(archive, 4, 5, gz=False)
    damaged = _damage_member_header(archive, 2, inner=True)  # member 0 is README.txt
    r = cli(archive, str(tmp_path / "out"), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert f"warning: {damaged}: damaged after 0 images" in r.stderr
    assert info(str(tmp_path / "out"))["splits"]["train"]["num_samples"] == 15
    assert info(str(tmp_path / "out"))["make_shards"]["train"]["damaged_inner_tars"][0].startswith(damaged)


def test_user_errors_are_one_message(tmp_path):
    """A missing source, a cut-off or damaged archive, nothing to merge: one message, no traceback."""
    cut = tmp_path / "cut.tar.gz"
    write_archive(str(cut), 3, 4)
    data = cut.read_bytes()
    cut.write_bytes(data[:len(data) // 2])  # a cut-off download
    broken = tmp_path / "broken.tar"
    write_archive(str(broken), 4, 3, gz=False)
    _damage_member_header(str(broken), 3)  # the third class: tarfile alone would stop there without a word
    broken_gz = tmp_path / "broken.tar.gz"
    broken_gz.write_bytes(gzip.compress(broken.read_bytes()))
    stops_after = f"damaged after its member '{synset(1)}.tar'"
    binary = tmp_path / "photo.zip"
    binary.write_bytes(bytes(range(256)) * 4)
    a_file = tmp_path / "a_file"
    a_file.write_text("OUT must be a folder")
    cases = [([str(tmp_path / "nope.tar"), str(tmp_path / "o1")], "no such file"),
             ([str(cut), str(tmp_path / "o2")], "cannot read it to the end"),
             ([str(tmp_path / "o3"), "--merge"], "nothing to merge"),
             ([str(broken), str(tmp_path / "o4")], stops_after),
             ([str(broken_gz), str(tmp_path / "o5")], stops_after),
             ([str(binary), str(tmp_path / "o6")], "neither a folder, a tar archive nor a list file"),
             (["--list", str(tmp_path / "nope.txt"), str(tmp_path / "o7")], "no such file"),
             ([str(cut), str(a_file / "out")], "Not a directory; fix that and run the same command again")]
    for args, words in cases:
        r = cli(*args)
        assert r.returncode == 1 and words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


# ----------------------------------------------------------------------------- training on it
@pytest.mark.slow
def test_training_on_the_archive_shards(release, tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu"}
    r = subprocess.run(["swinv2-train", f"data.root={release['out']}", f"run.dir={tmp_path / 'run'}",
                        "model.img_size=32", "model.window_size=4", "train.batch_size=8", "train.max_steps=3",
                        "train.eval_every=0", "train.ckpt_every=0", "data.num_workers=1", "data.augment=light",
                        "train.progress=lines", "sched.warmup_steps=0"],
                       capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    metrics = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert any(m.get("step") == 3 for m in metrics)


def test_throughput_benchmark_runs_and_projects(tmp_path):
    """scripts/bench_make_shards.py (docs/PERFORMANCE.md section 7) at a few images: its fields."""
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "scripts/bench_make_shards.py", "--num-images", "24", "--classes", "3",
                        "--samples-per-shard", "6", "--out", str(out)], capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr
    res = json.load(open(out))
    assert res["meta"]["command"].startswith("scripts/bench_make_shards.py") and "cpu_model" in res["meta"]
    assert set(res["images_per_s"]) == set(res["cpu_ms_per_image"]) == {"1", "2"}
    assert 80 < res["release"]["mean_image_kb"] < 140  # ImageNet-sized files
    assert res["projection_winter21"]["write_hours"] > 0 and "ImageNet-21K (13.2M images)" in r.stdout
