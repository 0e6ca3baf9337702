# A temporary root for what a test run writes outside the clone, sourced by tests/run.sh.
#
# temproot_start makes it, short (unix socket paths inside must stay under ~100 bytes), and points TMPDIR into it:
# Python's tempfile (the tests' short private directories, pytest's basetemp `pytest-of-<user>`, circus' sockets, the
# broker's runtime directory `aiida-zmq-<uid>`, the calcjob folders of aiida-core's suite) and IPYTHONDIR
# (`~/.ipython`, which importing aiida-core's shell support creates). It notes what $HOME holds.
# temproot_check lists what the run left: in the root, anything but pytest's own basetemp (pytest keeps the last
# three on purpose, for looking at a failure; they go with the root), the broker's runtime directory when empty, and
# aiida-core's circus socket directories (`tmpXXXXXXXX` with only `circus.*.sock`: aiida-core's DaemonClient makes
# one whenever it is asked for the daemon's sockets while no daemon runs, and never removes it); in $HOME, any new
# entry. It returns 1 when it found something. temproot_remove removes the root; run.sh calls it from its EXIT trap,
# however the run ends.

AZMQ_TEMP_ROOT=
AZMQ_HOME_BEFORE=

temproot_start() {
    AZMQ_HOME_BEFORE=$(ls -A "$HOME" 2>/dev/null | sort)
    AZMQ_TEMP_ROOT=$(mktemp -d "${TMPDIR:-/tmp}/azr-XXXXXX")
    export TMPDIR="$AZMQ_TEMP_ROOT" IPYTHONDIR="$AZMQ_TEMP_ROOT/ipython"
}

# Whether $1 (in the root) is aiida-core's: a directory `tmp*` holding circus sockets only, or nothing.
_temproot_circus_dir() {
    case "$1" in tmp*) ;; *) return 1 ;; esac
    [ -d "$AZMQ_TEMP_ROOT/$1" ] && [ -z "$(cd "$AZMQ_TEMP_ROOT/$1" && ls -A | grep -v -x 'circus\..\.sock')" ]
}

temproot_check() {
    local left='' entry home_after new_home
    for entry in $(cd "$AZMQ_TEMP_ROOT" && ls -A); do
        case "$entry" in "pytest-of-$(id -un)" | ipython) continue ;; esac
        [ "$entry" = "aiida-zmq-$(id -u)" ] && [ -z "$(ls -A "$AZMQ_TEMP_ROOT/$entry")" ] && continue
        _temproot_circus_dir "$entry" && continue
        left="$left $entry"
    done
    home_after=$(ls -A "$HOME" 2>/dev/null | sort)
    new_home=$(comm -13 <(printf '%s\n' "$AZMQ_HOME_BEFORE") <(printf '%s\n' "$home_after") | grep -v '^$' || true)
    if [ -z "$left" ] && [ -z "$new_home" ]; then
        echo '== left behind: nothing (temporary files of the run, its TMPDIR, removed now)'
        return 0
    fi
    echo '== LEFT BEHIND by the tests (a test must remove what it makes outside its tmp_path):' >&2
    [ -n "$left" ] && (cd "$AZMQ_TEMP_ROOT" && du -sh $left 2>/dev/null | sed 's/^/   in $TMPDIR: /' >&2)
    [ -n "$new_home" ] && printf '   in $HOME: %s\n' $new_home >&2
    return 1
}

temproot_remove() {
    if [ -n "$AZMQ_TEMP_ROOT" ] && [ -d "$AZMQ_TEMP_ROOT" ]; then
        rm -rf "$AZMQ_TEMP_ROOT"
    fi
}
