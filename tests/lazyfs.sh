# LazyFS for the power-cut tests (tests/test_power_cut.py), sourced by tests/run.sh.
#
# lazyfs_build finds a LazyFS binary (AIIDA_ZMQ_LAZYFS, build/lazyfs in this clone, ~/.cache/lazyfs) or builds one
# into build/lazyfs (inside the clone, git-ignored, reused by the next run) with ../shared/tools/lazyfs/build.sh, which
# downloads nothing. Only where this machine allows: root and /dev/fuse (the tests mount it). Its build dependencies
# are installed with apt-get where missing. Elsewhere it says why, and the tests skip, saying why too.
# AIIDA_ZMQ_NO_LAZYFS=1 opts out. It exports AIIDA_ZMQ_LAZYFS for the tests.

LAZYFS_PACKAGES='fuse3 libfuse3-dev libtoml11-dev libspdlog-dev cmake g++ pkg-config'

lazyfs_build() {
    local built=build/lazyfs/src/lazyfs/build/lazyfs script=../shared/tools/lazyfs/build.sh candidate missing
    if [ -n "${AIIDA_ZMQ_NO_LAZYFS:-}" ]; then
        return 0
    fi
    if [ "$(id -u)" != 0 ] || [ ! -e /dev/fuse ]; then
        echo '== LazyFS: needs root and /dev/fuse: the power-cut tests will skip'
        return 0
    fi
    for candidate in "${AIIDA_ZMQ_LAZYFS:-}" "$built" "${XDG_CACHE_HOME:-$HOME/.cache}/lazyfs/src/lazyfs/build/lazyfs"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ]; then
            export AIIDA_ZMQ_LAZYFS=$(realpath "$candidate")
            return 0
        fi
    done
    if [ ! -x "$script" ]; then
        echo "== LazyFS: no $script to build it from: the power-cut tests will skip"
        return 0
    fi
    missing=$(for p in $LAZYFS_PACKAGES; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || echo "$p"; done)
    if [ -n "$missing" ] && command -v apt-get >/dev/null; then
        echo "== installing" $missing "(for the power-cut tests)"
        # shellcheck disable=SC2086
        timeout 600 apt-get install -y -qq $missing >/dev/null 2>&1 \
            || (timeout 300 apt-get update -qq >/dev/null 2>&1 && timeout 600 apt-get install -y -qq $missing >/dev/null 2>&1) \
            || echo 'could not install them: the power-cut tests may skip'
    fi
    echo '== building LazyFS into build/lazyfs (1-2 minutes, once)'
    mkdir -p build
    if timeout 900 "$script" "$PWD/build/lazyfs" >/dev/null 2>build/lazyfs.log; then
        export AIIDA_ZMQ_LAZYFS=$PWD/$built
    else
        echo 'the LazyFS build failed (build/lazyfs.log): the power-cut tests will skip'
    fi
}
