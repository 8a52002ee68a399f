#!/usr/bin/env bash
# Build llama.cpp's own llama-server and llama-bench from exactly the llama.cpp sources this package
# is pinned to (the llama-cpp-python sdist named in CMakeLists.txt, hash-checked, as the C library's
# build fetches it), with GGML_BACKEND_DL=ON: ggml loads its backends from shared libraries, which
# is how an out-of-tree backend library (GGML_BACKEND_PATH) joins a process without Python. The
# CPU backend is built in every variant ggml picks from at run time (GGML_CPU_ALL_VARIANTS, as
# llama.cpp's Linux releases are built; GGML_NATIVE cannot be combined with GGML_BACKEND_DL).
#
#     scripts/build_llama_server.sh [OUT_DIR]      (default ~/.cache/ripple-gguf/llama-server-<version>)
#
# then `ripple-gguf llama-server --model m.ripple.gguf ...` (or llama-bench) runs the program with
# GGML_BACKEND_PATH naming this package's library.
#
# Prints the build time and the binaries' paths. Nothing is downloaded but the sdist, from PyPI,
# when it is not already in ~/.cache/ripple-gguf (or RIPPLE_LLAMA_SDIST).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
pin() { sed -n "s/^set($1 \"\\(.*\\)\")$/\\1/p" "$here/CMakeLists.txt" | head -1; }
version="$(pin RIPPLE_LLAMA_CPP_PYTHON_VERSION)"
sha="$(pin RIPPLE_LLAMA_SDIST_SHA256)"
url="$(sed -n 's/^ *"\(https:\/\/files.pythonhosted.org\/.*\)\${RIPPLE_LLAMA_CPP_PYTHON_VERSION}.tar.gz")$/\1/p' "$here/CMakeLists.txt")${version}.tar.gz"
[ -n "$version" ] && [ -n "$sha" ] || { echo "build_llama_server: cannot read the pins from $here/CMakeLists.txt" >&2; exit 2; }
cache="${HOME}/.cache/ripple-gguf"
sdist="${RIPPLE_LLAMA_SDIST:-$cache/llama_cpp_python-$version.tar.gz}"
out="${1:-$cache/llama-server-$version}"
mkdir -p "$cache" "$out"
if [ ! -f "$sdist" ] || [ "$(sha256sum "$sdist" | cut -d' ' -f1)" != "$sha" ]; then
    echo "build_llama_server: fetching $url" >&2
    python -c "import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])" "$url" "$sdist.part"
    mv "$sdist.part" "$sdist"
fi
have="$(sha256sum "$sdist" | cut -d' ' -f1)"
[ "$have" = "$sha" ] || { echo "build_llama_server: $sdist has sha256 $have, expected $sha" >&2; exit 2; }
src="$out/src"
if [ ! -f "$src/CMakeLists.txt" ]; then
    rm -rf "$out/extract" && mkdir -p "$out/extract"
    tar -xzf "$sdist" -C "$out/extract" "llama_cpp_python-$version/vendor/llama.cpp"
    rm -rf "$src" && mv "$out/extract/llama_cpp_python-$version/vendor/llama.cpp" "$src" && rm -rf "$out/extract"
fi
start=$(date +%s)
cmake -S "$src" -B "$out/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_BACKEND_DL=ON \
      -DGGML_NATIVE=OFF -DGGML_CPU_ALL_VARIANTS=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
      -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON > "$out/configure.log" 2>&1 || { echo "build_llama_server: configure failed, see $out/configure.log" >&2; exit 1; }
cmake --build "$out/build" -j "$(nproc)" --target llama-server llama-bench > "$out/build.log" 2>&1 || { echo "build_llama_server: build failed, see $out/build.log" >&2; exit 1; }
echo "build_llama_server: built in $(( $(date +%s) - start )) s (llama.cpp of llama-cpp-python $version, GGML_BACKEND_DL=ON)"
echo "llama-server: $out/build/bin/llama-server"
echo "llama-bench:  $out/build/bin/llama-bench"
lib="$(ls "$here"/ripple_gguf/_libripple*.so 2>/dev/null | head -1)"
echo "run: ripple-gguf llama-server --build-dir $out --model m.ripple.gguf [llama-server options]"
echo " or: GGML_BACKEND_PATH=${lib:-<ripple_gguf/_libripple*.so>} $out/build/bin/llama-server --model m.ripple.gguf"
