# Sourced by the scenario scripts: run in the scratch folder $1 and print every command,
# its stdout, its stderr and its exit code, so two runs (qemu-img, then vdisk under the
# name qemu-img) can be diffed as a whole. `qemu-img` and `qemu-io` come from PATH.
#
# stdout and stderr are captured apart and printed one after the other: their interleaving
# on a shared pipe depends on stdio buffering, which no script should rely on.

set -u
cd "$1" || exit 99

# run CMD...: the command line, then its output and exit code.
run() {
    echo "\$ $*"
    "$@" >.out 2>.err
    local rc=$?
    sed 's/^/  | /' .out
    sed 's/^/  ! /' .err
    echo "  exit $rc"
}

# run_info CMD...: like run, for `info` of an image the tool under test wrote. Only the
# host allocation (st_blocks, "disk size" / "actual-size") is dropped: it depends on the
# file system and the tool's write sizes, not on what the image means.
run_info() {
    echo "\$ $*"
    "$@" >.out 2>.err
    local rc=$?
    grep -v -e '^ *disk size: ' -e '"actual-size": ' .out | sed 's/^/  | /'
    sed 's/^/  ! /' .err
    echo "  exit $rc"
}

# run_nodate CMD...: like run, with the wall-clock date and time of snapshots masked
# (the two runs happen at different times).
run_nodate() {
    echo "\$ $*"
    "$@" >.out 2>.err
    local rc=$?
    sed -E -e 's/[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}/<date>/' \
        -e 's/"date-(sec|nsec)": [0-9]+/"date-\1": <n>/' \
        -e '/"actual-size": /d' -e '/^ *disk size: /d' .out | sed 's/^/  | /'
    sed 's/^/  ! /' .err
    echo "  exit $rc"
}

# io FMT FILE CMD...: guest writes or reads through qemu-io (the real one in both runs);
# prints only whether they succeeded, since qemu-io's timing lines vary.
io() {
    local fmt=$1 file=$2
    shift 2
    local args=()
    for c in "$@"; do
        args+=(-c "$c")
    done
    if qemu-io -f "$fmt" "${args[@]}" "$file" >.io 2>&1 && ! grep -q -e failed -e error .io; then
        echo "# qemu-io $file: ok ($*)"
    else
        echo "# qemu-io $file: FAILED ($*)"
        sed 's/^/  # /' .io
    fi
}

# run_layout CMD...: like run_info, for `info` of a VMDK or VHDX the tool under test wrote:
# also drops the host file's length (where the driver placed metadata and how well grains
# compressed are its own choices) and VMDK content IDs (random in both tools).
run_layout() {
    echo "\$ $*"
    "$@" >.out 2>.err
    local rc=$?
    grep -v -e '^ *disk size: ' -e '"actual-size": ' -e '^    file length: ' \
        -e '^    cid: ' -e '^    parent cid: ' .out | sed 's/^/  | /'
    sed 's/^/  ! /' .err
    echo "  exit $rc"
}

# run_check CMD...: like run, for `check` after snapshots were deleted: the image end
# offset (the highest cluster in use) is where the tool's allocator put new metadata.
run_check() {
    echo "\$ $*"
    "$@" >.out 2>.err
    local rc=$?
    grep -v -e '^Image end offset: ' -e '"image-end-offset": ' .out | sed 's/^/  | /'
    sed 's/^/  ! /' .err
    echo "  exit $rc"
}
