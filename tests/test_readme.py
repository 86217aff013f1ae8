"""The README is the contract with new users and with CI: its quick start stays two commands, CI
runs its test command verbatim, and every command of ours in the bash blocks of the README and of the
reference pages it links (DOC_PAGES: docs/data.md, configuration.md, run-directory.md, launch.md) runs
as typed. The pages' links and anchors resolve, and the source files they name exist.

The example runner executes each `swinv2-*` command of these pages, in the order of DOC_PAGES and
each page's order, once per distinct command (and `python -m swinv2_train.checkpoint ...`), through bash (so quoting and
brace expansion happen as in a user's shell) with example paths substituted: `/data/imagenet`
becomes a small ImageFolder tree, `/d/` and `/runs/` folders under a temp dir. Brace patterns of
shards that no earlier command wrote are filled with copies of one small real shard. Training
commands get a suffix that shrinks the model and the run to a few steps (the recipe, data and
run-directory keys stay as typed), `swinv2-eval` of a `.pth` the same model keys, and
`swinv2-submit` gets `--dry-run`. A standalone `...` ("your other overrides") is dropped.
The ImageNet release archives (`/data/winter21_whole.tar.gz`, `/data/ILSVRC2012_img_train.tar`) are
miniature ones (tests/imagenet_archive.py) and `/data/fall11_synsets.txt` 21,841 synsets that include
theirs. An `sbatch --array=A-B ... --wrap 'CMD'` of our tools runs CMD once per task id, all at once,
with SLURM_ARRAY_TASK_ID and SLURM_CPUS_PER_TASK=2 set (no SLURM needed). `http://fileserver:8000/`
is a Python http.server of the `/d/` folder on a free loopback port, stopped by its PID.
"""
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_helpers import jpeg_bytes, write_tar
from imagenet_archive import synset, write_archive

ROOT = Path(__file__).resolve().parents[1]
OUR_COMMANDS = ("swinv2-train", "swinv2-eval", "swinv2-make-shards", "swinv2-submit")
OUR_MODULES = ("python -m swinv2_train.checkpoint ",)  # run-directory.md's verify / export
CPU_EXAMPLE = "deepspeed --num_gpus 2 --master_addr 127.0.0.1"  # the README's CPU-only launcher line
# The reference pages the README links, in the order their commands run (later pages use what
# earlier ones wrote: /d/in1k and /runs/t256 come from the README's own-data commands).
DOC_PAGES = ("README.md", "docs/data.md", "docs/configuration.md", "docs/run-directory.md", "docs/launch.md")
# Pages whose links and named source files are checked (the diary, PERFORMANCE-notes.md, keeps the
# file names of its time).
LINKED_PAGES = DOC_PAGES + ("docs/PERFORMANCE.md",)
SMOKE = ["model.variant=tiny", "model.img_size=32", "model.window_size=4", "model.embed_dim=16",
         "model.depths=[1,1,1,1]", "model.num_heads=[1,2,2,4]", "model.attention=reference",
         "model.pretrained_window_sizes=[0,0,0,0]", "train.batch_size=8", "train.grad_accum=1",
         "train.max_steps=2", "train.eval_every=0", "train.ckpt_every=0", "train.precision=fp32",
         "train.activation_checkpointing.every=0", "train.progress=lines", "data.num_workers=1",
         "sched.warmup_steps=0", "logger.wandb.mode=disabled"]
CLASSES = 1000  # the README's examples are ImageNet-1K recipes


def readme() -> str:
    return (ROOT / "README.md").read_text()


def page(name: str) -> str:
    return (ROOT / name).read_text()


def quick_start_commands():
    section = readme().split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_quick_start_is_exactly_two_commands():
    cmds = quick_start_commands()
    assert len(cmds) == 2, cmds
    assert cmds[0].endswith("swinv2-train"), "first command must run the main job"
    assert "pytest" in cmds[1], "second command must run the tests"


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert quick_start_commands()[1] in ci_lines


def bash_commands(text: str):
    """Commands of the ```bash blocks: continuation lines joined, trailing comments dropped."""
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for cmd in re.sub(r"\\\n\s*", " ", block).splitlines():
            try:
                words = shlex.split(cmd, comments=True)
            except ValueError:  # a placeholder such as <this node's address>: not a command of ours
                words = cmd.split(" #", 1)[0].split()
            if words:
                yield cmd.split(" #", 1)[0].strip(), words


def wrapped_command(words):
    """The command of an `sbatch ... --wrap CMD` line, else None."""
    if words[0] != "sbatch":
        return None
    for i, w in enumerate(words):
        if w == "--wrap" and i + 1 < len(words):
            return words[i + 1]
        if w.startswith("--wrap="):
            return w[len("--wrap="):]
    return None


def our_commands(text: str):
    """Commands that start one of our tools (the quick start's install line excluded), and sbatch
    array jobs that wrap one."""
    return [cmd for cmd, words in bash_commands(text)
            if words[0] in OUR_COMMANDS or cmd.startswith(CPU_EXAMPLE) or cmd.startswith(OUR_MODULES)
            or (wrapped_command(words) or "").split(" ", 1)[0] in OUR_COMMANDS]


def documented_commands():
    """Every page's commands of ours, in DOC_PAGES order, each distinct command once."""
    seen, out = set(), []
    for name in DOC_PAGES:
        for cmd in our_commands(page(name)):
            key = " ".join(cmd.split())  # a continuation line leaves a double space
            if key not in seen:
                seen.add(key)
                out.append((name, cmd))
    return out


def test_readme_shows_each_user_command():
    seen = {c.split()[0] for c in our_commands(readme())} - {"sbatch"}
    assert seen == set(OUR_COMMANDS) | {"deepspeed"}, seen


def test_a_readme_example_that_names_a_model_builds_it_with_the_stated_size(tmp_path):
    """The README's `model=X` example trains the model it names, of the parameter count its comment
    states (with the 1K head of its ImageNet-1K shards), not the embedded default's toy."""
    import dataclasses

    import swinv2
    from hydra import compose, initialize_config_dir
    from swinv2_train.cli import prepare_overrides
    from swinv2_train.spec import resolve_spec

    picks = [line for line in readme().splitlines()
             if line.startswith("swinv2-train") and re.search(r"\smodel(\.variant)?=", line)]
    assert picks, "the README shows no example that names a model"
    for cmd in picks:
        args, _, comment = cmd.partition(" #")
        args = args.replace(" /d/", f" {tmp_path}/d/").replace("=/d/", f"={tmp_path}/d/")
        for root in re.findall(r"data\.root=(\S+)", args):
            os.makedirs(root, exist_ok=True)  # checked to exist; not read (resolve_data=False)
        stated = float(re.search(r"([\d.]+)M parameters", comment).group(1))
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose("train", overrides=prepare_overrides(shlex.split(args)[1:]))
        model = dataclasses.replace(resolve_spec(cfg, world_size=1, resolve_data=False).model, num_classes=CLASSES)
        with torch.device("meta"):
            built = sum(p.numel() for p in swinv2.SwinTransformerV2(model).parameters())
        assert round(built / 1e6, 1) == stated, (cmd, built)


@pytest.mark.parametrize("name", DOC_PAGES[1:])
def test_reference_page_is_linked_and_has_commands(name):
    """The README links every reference page, and each one's commands are found (and so run)."""
    assert f"]({name})" in readme(), f"README does not link {name}"
    assert our_commands(page(name)), f"no command of ours found in {name}'s bash blocks"


def _headings(text: str):
    """GitHub's anchors of a page's headings (fenced code, where `#` starts comments, skipped)."""
    anchors, fenced = set(), False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def _links(text: str):
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            yield from re.findall(r"\]\(([^)\s]+)\)", line)


@pytest.mark.parametrize("name", LINKED_PAGES)
def test_links_and_anchors_resolve(name):
    """Relative links point at files that exist, and their #anchors at headings there."""
    broken = []
    for link in _links(page(name)):
        if re.match(r"[a-z]+://", link):
            continue
        path, _, anchor = link.partition("#")
        target = (ROOT / name).parent / path if path else ROOT / name
        if not target.exists():
            broken.append(link)
        elif anchor and target.suffix == ".md" and anchor not in _headings(target.read_text()):
            broken.append(link)
    assert not broken, f"{name}: {broken}"


@pytest.mark.parametrize("name", LINKED_PAGES)
def test_named_source_files_exist(name):
    """Source files the pages name (train/lifecycle.py, scripts/bench_gpu.py, ...) exist: a module
    renamed or removed shows up here."""
    named = re.findall(r"(?<![\w./])((?:train|swinv2|scripts|launch|tests|configs)/[\w/.-]*\.(?:py|yaml|sbatch))",
                       page(name))
    missing = sorted({p for p in named if not (ROOT / p).exists()})
    assert not missing, f"{name} names files that do not exist: {missing}"


def _image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):  # one small image per class and split
        for c in range(CLASSES):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            img = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
            Image.fromarray(img).save(d / "0.png")
    return root


def _fill_brace_patterns(cmd: str, template_shard: Path) -> None:
    """Shards named by a brace pattern that do not exist yet: copies of one real small shard."""
    for m in re.finditer(r"(\S*?)\{(\d+)\.\.(\d+)\}(\S*?\.tar)", cmd):
        head, lo, hi, tail = m.group(1).split("=")[-1].strip("'\""), m.group(2), m.group(3), m.group(4).strip("'\"")
        for i in range(int(lo), int(hi) + 1):
            path = Path(f"{head}{i:0{len(lo)}d}{tail}")
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(template_shard, path)


def _releases(tmp: Path) -> dict:
    """Miniature ImageNet release archives and the fall11 synset list, by the paths the pages use."""
    d = tmp / "releases"
    d.mkdir()
    write_archive(d / "winter21_whole.tar.gz", gz=True)
    write_archive(d / "ILSVRC2012_img_train.tar", gz=False)
    (d / "fall11_synsets.txt").write_text("".join(f"{synset(i)}\n" for i in range(21841)))
    return {f"/data/{p.name}": str(p) for p in d.iterdir()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbatch_array(cmd: str) -> str:
    """`sbatch --array=A-B ... --wrap CMD` as a bash line running CMD for every task id at once."""
    words = shlex.split(cmd)
    first, last = re.search(r"--array[= ](\d+)-(\d+)", cmd).groups()
    wrapped = shlex.quote(wrapped_command(words))
    return (f"pids=(); for i in $(seq {first} {last}); do SLURM_ARRAY_TASK_ID=$i SLURM_CPUS_PER_TASK=2 "
            f"bash -c {wrapped} & pids+=($!); done; for p in ${{pids[@]}}; do wait $p || exit 1; done")


def _as_run_here(cmd: str, tmp: Path, releases: dict | None = None, port: int = 0) -> str:
    cmd = re.sub(r"(?<=\s)\.\.\.(?=\s|$)", "", cmd).strip()  # "..." stands for the reader's other overrides
    for path, local in (releases or {}).items():
        cmd = cmd.replace(path, local)
    cmd = (cmd.replace("/data/imagenet", str(tmp / "imagefolder")).replace("/d/", f"{tmp}/d/")
              .replace("/runs/", f"{tmp}/runs/").replace("http://fileserver:8000/", f"http://127.0.0.1:{port}/"))
    if cmd.startswith("sbatch"):
        return _sbatch_array(cmd)
    tool = cmd.split()[0]
    if tool in ("swinv2-train", "deepspeed"):
        cmd += " " + " ".join(shlex.quote(s) for s in SMOKE)
    elif tool == "swinv2-eval" and ".pth" in cmd:  # weights trained with SMOKE's model sizes
        cmd += " " + " ".join(shlex.quote(s) for s in SMOKE if s.startswith("model."))
    elif tool == "swinv2-submit":
        cmd = cmd.replace("swinv2-submit", "swinv2-submit --dry-run", 1)
    return cmd


@pytest.mark.slow
def test_every_documented_command_runs_as_typed(tmp_path):
    _image_folder(tmp_path / "imagefolder")
    template = tmp_path / "template.tar"
    write_tar(template, [{"__key__": f"s{i}", "jpg": jpeg_bytes(i, (48, 48)), "cls": str(i % CLASSES).encode()}
                         for i in range(8)])
    experiment = tmp_path / "d" / "my_configs" / "experiment" / "my_run.yaml"
    experiment.parent.mkdir(parents=True)
    experiment.write_text("# @package _global_\ntrain:\n  max_steps: 3\n")
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "d").mkdir(exist_ok=True)
    releases, port = _releases(tmp_path), _free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                               str(tmp_path / "d")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {**os.environ, "WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu"}
    try:
        for name, cmd in documented_commands():
            line = _as_run_here(cmd, tmp_path, releases, port)
            _fill_brace_patterns(line, template)
            p = subprocess.run(["bash", "-c", line], cwd=work, env=env, capture_output=True, text=True,
                               timeout=900)
            assert p.returncode == 0, f"{name} command failed: {cmd}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
            assert "Traceback" not in p.stderr, f"{name}: {cmd}\n{p.stderr[-3000:]}"
    finally:
        os.kill(server.pid, 15)
        server.wait(timeout=30)


GPU_CHECK = ("PYTHONUNBUFFERED=1 python3 scripts/bench_gpu.py --configs base256_w8 --batch 128 --steps 5 "
             "--out $OUT/bench_gpu.json")  # the prepared device check (tests/test_perf_scripts.py runs it)


def test_performance_page_is_current_tables_with_date_machine_and_command():
    """docs/PERFORMANCE.md: each measured section gives its date, machine and command; the prepared
    GPU check stays on the page; the history lives in the notes file it links."""
    text = page("docs/PERFORMANCE.md")
    assert GPU_CHECK in text.splitlines()
    assert "](PERFORMANCE-notes.md)" in text and (ROOT / "docs" / "PERFORMANCE-notes.md").exists()
    sections = re.split(r"\n(?=## )", text)
    measured = [s for s in sections if re.match(r"## \d+\. ", s) and "NOT MEASURED" not in s.splitlines()[0]]
    assert len(measured) >= 6, [s.splitlines()[0] for s in sections]
    for s in measured:
        title = s.splitlines()[0]
        assert "\n| " in s, f"{title}: no table"
        assert re.search(r"20\d\d-\d\d-\d\d", s), f"{title}: no date"
        assert re.search(r"\b(AMD|Xeon)\b", s), f"{title}: no machine"
        assert re.search(r"`python3? (scripts/|-m )", s), f"{title}: no command"
