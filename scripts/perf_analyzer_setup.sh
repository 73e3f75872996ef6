#!/usr/bin/env bash
# Installs Triton's perf_analyzer into .perf/ (git-ignored), for the test that runs it
# against gpuserve and for scripts/perf_analyzer.sh:
#
#   scripts/perf_analyzer_setup.sh      # then: .perf/bin/perf_analyzer -m digits ...
#
# Its PyPI wheel holds a binary built for glibc 2.38 or newer. Where this machine's glibc is
# older (Debian 12 has 2.36), Debian 13's libc6, libstdc++6 and libgcc-s1 are downloaded with
# apt-get (a source list of its own under .perf/, nothing of the system's changed), unpacked
# beside it, and the binary runs through their dynamic loader. Never fails the caller: where
# it cannot install, it writes why to .perf/why and exits 0, and the test skips saying so.
set -uo pipefail
cd "$(dirname "$0")/.."
dest=.perf
python=${PYTHON:-.venv/bin/python}
version="perf-analyzer==2.60.0"
mkdir -p "$dest"
rm -f "$dest/why"
give_up() { echo "$1" > "$dest/why"; echo "perf_analyzer not installed: $1" >&2; exit 0; }
if [ -x "$dest/bin/perf_analyzer" ] && "$dest/bin/perf_analyzer" --version >/dev/null 2>&1; then
    exit 0
fi
rm -rf "$dest/wheel" "$dest/bin" && mkdir -p "$dest/wheel" "$dest/bin"
"$python" -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
    --python-version 3.11 --platform manylinux_2_38_x86_64 -d "$dest/wheel" "$version" \
    || give_up "pip could not download $version (manylinux_2_38 x86-64) from the registry"
"$python" -m zipfile -e "$dest"/wheel/perf_analyzer-*.whl "$dest/wheel/unpacked" \
    || give_up "the $version wheel could not be unpacked"
binary="$PWD/$dest/wheel/unpacked/perf_analyzer/bin/perf_analyzer"
chmod +x "$binary"
glibc="$(ldd --version 2>/dev/null | head -1 | awk '{print $NF}')"
if [ "$(printf '%s\n2.38\n' "$glibc" | sort -V | head -1)" = 2.38 ]; then
    printf '#!/bin/sh\nexec "%s" "$@"\n' "$binary" > "$dest/bin/perf_analyzer"
else
    command -v apt-get >/dev/null && command -v dpkg >/dev/null \
        || give_up "glibc $glibc here, perf_analyzer needs 2.38, and there is no apt-get to fetch one"
    apt="$PWD/$dest/apt"
    rm -rf "$apt" && mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/sources"
    cat > "$apt/sources/trixie.sources" <<'SOURCES'
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
    options=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$apt/sources"
        -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" -o Debug::NoLocking=1
        -o APT::Sandbox::User=root)
    apt-get -qq "${options[@]}" update >/dev/null 2>&1 \
        || give_up "glibc $glibc here; apt-get could not read Debian 13's package lists"
    (cd "$apt" && apt-get -qq "${options[@]}" download libc6 libstdc++6 libgcc-s1 >/dev/null 2>&1) \
        || give_up "glibc $glibc here; apt-get could not download Debian 13's libc6, libstdc++6, libgcc-s1"
    root="$PWD/$dest/root"
    rm -rf "$root" && mkdir -p "$root"
    for deb in "$apt"/*.deb; do dpkg -x "$deb" "$root"; done
    libs="$root/usr/lib/x86_64-linux-gnu"
    printf '#!/bin/sh\nexec "%s/ld-linux-x86-64.so.2" --library-path "%s:/lib/x86_64-linux-gnu" "%s" "$@"\n' \
        "$libs" "$libs" "$binary" > "$dest/bin/perf_analyzer"
fi
chmod +x "$dest/bin/perf_analyzer"
"$dest/bin/perf_analyzer" --version >/dev/null 2>&1 \
    || give_up "perf_analyzer was installed but does not start here (glibc $glibc)"
echo "perf_analyzer installed: $dest/bin/perf_analyzer"
