#!/usr/bin/env bash
# The GPU check: the GPU test tier (python -m pytest -m gpu) and then bench_gpu.py (SwinV2-B 256/W8
# bf16 images/s and MFU, ours vs HF transformers' Swinv2, the measured matmul peak beside the table's),
# on one GPU machine that has torch but not DeepSpeed, Hydra, webdataset or wandb and no network.
#
#   scripts/gpu_check.sh --prepare-wheels [DIR]   here, with PyPI: the wheels it needs into DIR (default .gpu_wheels)
#   scripts/gpu_check.sh --dry-run OUT_DIR        here, on any machine: its plumbing (wheels, sizes, commands)
#   scripts/gpu_check.sh OUT_DIR                  on the GPU machine, from the checkout's root
#
# Everything goes under OUT_DIR (at most 8 files: gpu_check.log, tests.log, tests.xml, bench_gpu.log,
# bench_gpu.json, summary.txt), each step under its own time limit, so a run cut off keeps what it has.
# The wheels install into a temporary folder on PYTHONPATH, the project is put on it as installed
# (swinv2, swinv2_train, swinv2_tools, swinv2_launch) by links to the checkout: nothing is written into
# the machine's Python. GPU_WHEELS=DIR overrides the wheel folder; PYTHON the interpreter (python3).
set -u
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEELS=${GPU_WHEELS:-$ROOT/.gpu_wheels}
PY=${PYTHON:-python3}
CARRY_LIMIT_MIB=64
# What the GPU machine lacks (docs/PERFORMANCE.md, section 6): the trainer's imports for the tier with
# logger=none (no wandb, no tensorboard) and DeepSpeed's own requirements; pinned to the versions this
# project is tested with. deepspeed and antlr4-python3-runtime come only as sources: built here.
BINARY=(hydra-core==1.3.8 omegaconf==2.3.1 webdataset==1.0.2 braceexpand==0.1.7 hjson==3.1.0 pydantic==2.13.4
        pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 typing-extensions==4.16.0)
SOURCE=(deepspeed==0.19.8 antlr4-python3-runtime==4.9.3)
# the tier's files: ours in order (compile, the slowest, last), and any other test file with a gpu test
TIER_FIRST=(tests/test_gpu_kernels.py tests/test_gpu_memory.py tests/test_gpu_train.py)
TIER_LAST=(tests/test_gpu_compile.py)
mapfile -t TIER_OTHER < <(cd "$ROOT" && grep -l -E 'pytest\.mark\.gpu|from gpu_helpers import' tests/test_*.py |
                          grep -v -x -F "${TIER_FIRST[@]/#/-e}" -e "${TIER_LAST[0]}")
TIER=("${TIER_FIRST[@]}" "${TIER_OTHER[@]}" "${TIER_LAST[@]}")
TIER_LIMIT_S=240
BENCH=(scripts/bench_gpu.py --parts peak,throughput --configs base256_w8 --batch 256 --steps 5 --no-compile)
BENCH_LIMIT_S=75

usage() { sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

# name of a distribution as its wheel file spells it (hydra-core -> hydra_core)
wheel_name() { local n=${1%%==*}; echo "${n//-/_}"; }

prepare_wheels() {
    local dir=${1:-$WHEELS} pipdl=(--python-version 3.12 --implementation cp --only-binary=:all:
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    mkdir -p "$dir" || exit 1
    "$PY" -m pip download -q --no-deps "${pipdl[@]}" -d "$dir" "${BINARY[@]}" || exit 1
    # built without the ops (DeepSpeed compiles what it needs on first use; the trainer uses none)
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$dir" "${SOURCE[@]}" || exit 1
    list_wheels "$dir"
}

# the wheels of DIR, one per required distribution, with sizes; exit 1 where one is missing or doubled
list_wheels() {
    local dir=$1 total=0 missing=0 spec n files size
    for spec in "${BINARY[@]}" "${SOURCE[@]}"; do
        n=$(wheel_name "$spec")
        files=$(find "$dir" -maxdepth 1 -iname "${n}-${spec##*==}-*.whl" 2>/dev/null)
        if [ "$(echo -n "$files" | grep -c .)" != 1 ]; then
            echo "MISSING: one wheel of $spec in $dir (found: ${files:-none})"; missing=1; continue
        fi
        size=$(stat -c %s "$files"); total=$((total + size))
        awk -v f="$(basename "$files")" -v s="$size" 'BEGIN {printf "  %-80s %6.2f MiB\n", f, s / 1048576}'
    done
    awk -v s="$total" 'BEGIN {printf "  wheels in all: %.2f MiB\n", s / 1048576}'
    [ $missing = 0 ] || { echo "gpu_check: wheels missing in $dir: run scripts/gpu_check.sh --prepare-wheels first (needs PyPI)"; return 1; }
}

# the working tree that travels to the device machine: tracked + untracked-not-ignored files (+ the wheels)
tree_mib() {
    (cd "$ROOT" && git ls-files -z -co --exclude-standard | xargs -0 stat -c %s 2>/dev/null |
        awk '{s += $1} END {printf "%.2f", s / 1048576}')
}

# the project's packages as installed, by links into the checkout (setup.py's ROOTS)
link_project() {
    local site=$1 f
    mkdir -p "$site/swinv2_train" "$site/bin" || return 1
    ln -sfn "$ROOT/swinv2" "$site/swinv2"; ln -sfn "$ROOT/scripts" "$site/swinv2_tools"
    ln -sfn "$ROOT/launch" "$site/swinv2_launch"
    for f in "$ROOT"/train/*; do ln -sfn "$f" "$site/swinv2_train/$(basename "$f")"; done
    ln -sfn "$ROOT/configs" "$site/swinv2_train/configs"
    printf '#!/bin/sh\nexec %s -m swinv2_train.main "$@"\n' "$PY" > "$site/bin/swinv2-train"
    chmod +x "$site/bin/swinv2-train"
}

install_cmd() { echo "$PY -m pip install -q --no-index --no-deps --no-compile --target $1 $WHEELS/*.whl"; }
tier_cmd() { echo "timeout $TIER_LIMIT_S $PY -m pytest -p no:cacheprovider -m gpu -v -rs --durations=0 --junitxml $1/tests.xml ${TIER[*]}"; }
bench_cmd() { echo "timeout $BENCH_LIMIT_S $PY ${BENCH[*]} --out $1/bench_gpu.json"; }

dry_run() {
    local out=$1 site
    mkdir -p "$out" || exit 1
    echo "gpu_check --dry-run: what a run on the GPU machine carries and runs"
    echo "wheels ($WHEELS):"
    list_wheels "$WHEELS" || exit 1
    local tree; tree=$(tree_mib)
    local wheels; wheels=$(du -sm --apparent-size "$WHEELS" | cut -f1)
    echo "travels: working tree $tree MiB + wheels ~$wheels MiB (limit $CARRY_LIMIT_MIB MiB)"
    awk -v t="$tree" -v w="$wheels" -v l=$CARRY_LIMIT_MIB 'BEGIN {exit !(t + w <= l)}' ||
        { echo "gpu_check: over the $CARRY_LIMIT_MIB MiB that can travel"; exit 1; }
    site=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" --python-version 3.12 \
        --implementation cp --only-binary=:all: --platform manylinux2014_x86_64 "$WHEELS"/*.whl ||
        { echo "gpu_check: the wheels do not install together for CPython 3.12"; exit 1; }
    echo "the wheels install together (pip --target, CPython 3.12, x86_64)"
    rm -rf "$site"; site=$(mktemp -d); link_project "$site" || exit 1
    PYTHONPATH=$site "$PY" -c "import swinv2, swinv2_train.plan, swinv2_tools.bench_gpu" ||
        { echo "gpu_check: the linked project does not import"; exit 1; }
    PYTHONPATH=$site "$site/bin/swinv2-train" run.plan=true run.plan_ranks=8 > "$out/plan.txt" 2>&1 ||
        { cat "$out/plan.txt"; echo "gpu_check: swinv2-train run.plan=true fails through the links"; exit 1; }
    echo "project linked in $site: swinv2, swinv2_train (its configs: swinv2-train run.plan=true ran), swinv2_tools import"
    echo "would run:"
    echo "  $(install_cmd /tmp/gpu_check_site)"
    echo "  $(tier_cmd "$out") > $out/tests.log"
    echo "  $(bench_cmd "$out") > $out/bench_gpu.log"
    PYTHONPATH=$site "$PY" -m pytest -p no:cacheprovider -m gpu --collect-only -q "${TIER[@]/#/$ROOT/}" 2>&1 | tail -1
    rm -rf "$site"
}

step() {  # step NAME LOG CMD...: run, keep its output, record its exit status in the summary
    local name=$1 log=$2; shift 2
    echo "== $name: $*"
    local t0=$SECONDS
    "$@" > "$log" 2>&1
    local rc=$?
    echo "$name: exit $rc, $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
    tail -n 25 "$log"
    [ $rc = 0 ] || FAILED=$((FAILED + 1))
    return $rc
}

run_check() {
    OUT=$(mkdir -p "$1" && cd "$1" && pwd) || exit 1
    check_steps 2>&1 | tee -a "$OUT/gpu_check.log"
    exit "${PIPESTATUS[0]}"
}

check_steps() {
    FAILED=0
    date -u +"gpu_check %Y-%m-%dT%H:%M:%SZ on $(uname -n)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    list_wheels "$WHEELS" || return 1
    local site=/tmp/gpu_check_site
    step install "$OUT/install.log" $(install_cmd "$site") && link_project "$site" || return 1
    rm -f "$OUT/install.log"  # within the 8 files that come back
    export PYTHONPATH=$site PATH=$site/bin:$PATH PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=/tmp/gpu_check_ext
    "$PY" -c "import torch, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'deepspeed', deepspeed.__version__)"
    cd "$ROOT" || return 1
    step "gpu tier" "$OUT/tests.log" $(tier_cmd "$OUT")
    step bench_gpu "$OUT/bench_gpu.log" $(bench_cmd "$OUT")
    cat "$OUT/summary.txt"
    [ "$FAILED" = 0 ] || { echo "gpu_check: $FAILED step(s) failed (their logs are in $OUT)"; return 1; }
}

case "${1:-}" in
    --prepare-wheels) prepare_wheels "${2:-}" ;;
    --dry-run) [ $# = 2 ] || usage; dry_run "$2" ;;
    -h|--help) usage 0 ;;
    ""|-*) usage ;;
    *) [ $# = 1 ] || usage; run_check "$1" ;;
esac
