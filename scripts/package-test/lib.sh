# shellcheck shell=bash
# Helpers of scripts/test-package, sourced by it: progress and check accounting, the cached
# Debian tree, the container booted from it with `systemd-nspawn --boot`, ways to run commands
# inside it (as root, as the deployer, as Nginx's worker user), HTTP requests through the
# container's Nginx on port 80, keter's journal, and a client that requests an app without
# pause and counts failed answers.
#
# The caller sets work (a private folder), root (the container's tree, under work), CACHE,
# SUITE, mirror and start_time, and calls stop_container from its EXIT trap; it reads
# client_ok, client_failed and client_failures after client_stop.
# shellcheck disable=SC2154,SC2034 # variables of the caller, and for the caller

say() { echo "test-package: [$((SECONDS - start_time)) s] $*" >&2; }

# A check that fails is counted and the run goes on, so that one run shows every broken
# promise; `fatal` stops the run when the later steps would mean nothing.
failures=()
checks=0
pass() {
    checks=$((checks + 1))
    say "ok: $1"
}
fail() {
    checks=$((checks + 1))
    failures+=("$1")
    say "FAILED: $1${2:+ ($2)}"
}
fatal() {
    say "FATAL: $*"
    exit 1
}
# check DESCRIPTION COMMAND...: passes when COMMAND succeeds.
check() {
    local what="$1"
    shift
    if "$@"; then pass "$what"; else fail "$what"; fi
}
# check_not DESCRIPTION COMMAND...: passes when COMMAND fails (its output is not shown).
check_not() {
    local what="$1"
    shift
    if "$@" >/dev/null 2>&1; then fail "$what"; else pass "$what"; fi
}
# Prints the failed checks and returns 1 when there is any.
report_checks() {
    if [ ${#failures[@]} -eq 0 ]; then
        say "all $checks checks passed"
        return 0
    fi
    say "${#failures[@]} of $checks checks failed:"
    local f
    for f in "${failures[@]}"; do echo "  - $f" >&2; done
    return 1
}

# wait_until COMMAND...: waits (up to 30 s) until COMMAND succeeds.
wait_until() {
    local _
    for _ in $(seq 1 300); do
        "$@" && return 0
        sleep 0.1
    done
    return 1
}

# --- The tree -------------------------------------------------------------------------------

# Makes (or takes from the cache) a tarball of a bookworm tree with systemd as init and every
# package in "$@" installed, and prints its path. The tarball's name carries a hash of the
# package list, so a package that starts to depend on another gets a tree built for it; a tree
# older than a week is rebuilt (security updates). Downloaded .debs and apt's lists are kept in the
# cache, so a rebuild downloads only what changed.
cached_tree() {
    local key tarball
    key="$(printf '%s\n' "$SUITE" "$@" | sort -u | sha256sum | cut -c1-12)"
    tarball="$CACHE/$SUITE-systemd-$key.tar"
    mkdir -p "$CACHE/archives/partial" "$CACHE/lists/partial" "$CACHE/debootstrap"
    # One builder at a time; a second run waits and then finds the tarball.
    exec 9>"$CACHE/.lock"
    flock 9
    if [ -z "$(find "$tarball" -mtime -7 2>/dev/null)" ]; then
        build_tree "$tarball" "$@"
    fi
    # Trees of other package lists (another branch's) stay until they are a week old.
    find "$CACHE" -maxdepth 1 -name "$SUITE-*.tar" -mtime +7 -delete
    flock -u 9
    exec 9>&-
    echo "$tarball"
}

build_tree() {
    local tarball="$1"
    shift
    local tree="$work/build-tree"
    say "building the $SUITE tree with $* from $mirror (cached as $tarball)"
    mkdir -p "$tree"
    debootstrap --variant=minbase --include=systemd,systemd-sysv \
        --cache-dir="$CACHE/debootstrap" "$SUITE" "$tree" "$mirror" \
        >"$work/debootstrap.log" 2>&1 \
        || { tail -n 20 "$work/debootstrap.log" >&2; fatal "debootstrap failed"; }
    # No service may start while packages are installed in a chroot: Nginx would bind port 80
    # of this machine.
    printf '#!/bin/sh\nexit 101\n' >"$tree/usr/sbin/policy-rc.d"
    chmod 755 "$tree/usr/sbin/policy-rc.d"
    cp /etc/resolv.conf "$tree/etc/resolv.conf"
    cp -r "$CACHE/lists/." "$tree/var/lib/apt/lists/"
    mount -t proc proc "$tree/proc"
    mount --bind "$CACHE/archives" "$tree/var/cache/apt/archives"
    local rc=0
    chroot "$tree" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
        LC_ALL=C.UTF-8 sh -c 'apt-get update -qq && apt-get install -y -qq --no-install-recommends "$@"' \
        sh "$@" >"$work/tree-apt.log" 2>&1 || rc=$?
    umount "$tree/var/cache/apt/archives"
    umount "$tree/proc"
    [ "$rc" -eq 0 ] || { tail -n 30 "$work/tree-apt.log" >&2; fatal "installing $* in the tree failed"; }
    cp -r "$tree/var/lib/apt/lists/." "$CACHE/lists/"
    rm -f "$tree/usr/sbin/policy-rc.d" "$tree/var/cache/apt/"*.bin
    echo keter-test >"$tree/etc/hostname"
    tar -C "$tree" -cf "$tarball.$$" .
    mv "$tarball.$$" "$tarball"
    rm -rf --one-file-system "$tree"
}

# --- The container --------------------------------------------------------------------------

machine="keter-test-$$"
nspawn_pid=""
leader=""

# Boots the tree at $root with systemd as PID 1, in a network namespace of its own (only a
# loopback device: port 80 inside is nobody else's), and waits until systemd has finished
# starting the default target. There is no systemd on the host, so no machined: the container
# is not registered and commands reach it through nsenter.
boot_container() {
    systemd-nspawn --quiet --boot --directory="$root" --machine="$machine" \
        --private-network --register=no --keep-unit --console=read-only \
        </dev/null >>"$work/console.log" 2>&1 &
    nspawn_pid=$!
    leader=""
    local _
    for _ in $(seq 1 300); do
        leader="$(pgrep -P "$nspawn_pid" -x systemd || true)"
        [ -n "$leader" ] && break
        kill -0 "$nspawn_pid" 2>/dev/null || { cat "$work/console.log" >&2; fatal "systemd-nspawn exited"; }
        sleep 0.05
    done
    [ -n "$leader" ] || fatal "the container's systemd did not start"
    local state=""
    for _ in $(seq 1 300); do
        # Fails while systemd's own socket is not there yet.
        state="$(in_ct timeout 60 systemctl is-system-running --wait 2>/dev/null)" && break
        case "$state" in running | degraded) break ;; esac
        sleep 0.1
    done
    if [ "$state" != running ]; then
        in_ct systemctl --failed --no-pager >&2 || true
        fatal "the container's systemd is '$state', not running"
    fi
}

# Keeps what a reader of a failed run needs in $1: keter's journal, the whole journal, Nginx's
# error log and the container's console.
save_evidence() {
    [ -n "$leader" ] && kill -0 "$leader" 2>/dev/null || return 0
    mkdir -p "$1"
    in_ct journalctl -q -u keter -o short-precise --no-pager >"$1/keter-journal.txt" 2>&1 || true
    in_ct journalctl -q -b -o short-precise --no-pager >"$1/journal.txt" 2>&1 || true
    in_ct cat /var/log/nginx/error.log >"$1/nginx-error.log" 2>/dev/null || true
    cp "$work/console.log" "$1/console.log" 2>/dev/null || true
}

# Powers the container off (systemd stops every unit) and waits for systemd-nspawn to exit.
stop_container() {
    [ -n "$nspawn_pid" ] || return 0
    if kill -0 "$nspawn_pid" 2>/dev/null; then
        kill -TERM "$nspawn_pid" 2>/dev/null || true
        local _
        for _ in $(seq 1 300); do
            kill -0 "$nspawn_pid" 2>/dev/null || break
            sleep 0.1
        done
        # Killing PID 1 of the container kills everything in its PID namespace.
        if kill -0 "$nspawn_pid" 2>/dev/null; then
            [ -n "$leader" ] && kill -KILL "$leader" 2>/dev/null
            kill -KILL "$nspawn_pid" 2>/dev/null || true
        fi
    fi
    wait "$nspawn_pid" 2>/dev/null || true
    nspawn_pid=""
    # systemd-nspawn does not remove its folder for `machinectl bind` when /run is not tmpfs.
    rm -rf "/run/systemd/nspawn/propagate/$machine"
}

# Runs a command inside the container as root: every namespace of its PID 1, an environment
# like a login's. Such a command is not in any unit: use systemd-run inside for that.
in_ct() {
    nsenter --target "$leader" --all \
        env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        LANG=C.UTF-8 TERM=dumb HOME=/root "$@"
}
# Runs a command inside the container as USER (no shell: system users have none).
as_user() {
    local user="$1"
    shift
    in_ct runuser -u "$user" -- "$@"
}
as_deployer() { as_user deployer "$@"; }

# --- HTTP through the container's Nginx ----------------------------------------------------

# Prints the answer of http://127.0.0.1PATH for Host HOST inside the container: the body on
# one line, then the status code.
get() {
    in_ct curl -sS -m 10 -o - -w ' %{http_code}' -H "Host: $1" "http://127.0.0.1${2:-/}" 2>&1 \
        | tr '\n' ' ' || true
}

# wait_answer HOST PATH TEXT: waits (ANSWER_TRIES tenths of a second, 30 s by default) until
# HOST answers PATH with 200 and a body containing TEXT; sets last_answer, and returns 1 if it
# never does.
last_answer=""
wait_answer() {
    local _
    for _ in $(seq 1 "${ANSWER_TRIES:-300}"); do
        last_answer="$(get "$1" "$2")"
        case "$last_answer" in *"$3"*" 200") return 0 ;; esac
        sleep 0.1
    done
    return 1
}
# check_answer DESCRIPTION HOST PATH TEXT: a check that HOST serves PATH with TEXT.
check_answer() {
    if wait_answer "$2" "$3" "$4"; then
        pass "$1"
    else
        fail "$1" "http://$2$3 answered: $last_answer"
    fi
}

# --- keter's journal --------------------------------------------------------------------------

# Prints a cursor of the container's journal now: journal_since CURSOR shows what came after.
journal_cursor() {
    local cursor
    cursor="$(in_ct journalctl -q -n 0 --show-cursor 2>/dev/null | sed -n 's/^-- cursor: //p')"
    [ -n "$cursor" ] || fatal "journalctl gives no cursor"
    echo "$cursor"
}
# journal_since CURSOR: keter's lines (and systemd's about its unit) logged after CURSOR.
journal_since() {
    if [ -n "$1" ]; then
        in_ct journalctl -q -u keter -o cat --no-pager --after-cursor="$1"
    else
        in_ct journalctl -q -u keter -o cat --no-pager
    fi
}
# wait_journal CURSOR REGEX: waits (up to 30 s) until keter's journal has a line matching the
# extended regular expression after CURSOR.
wait_journal() {
    local _
    for _ in $(seq 1 150); do
        journal_since "$1" | grep -Eq -- "$2" && return 0
        sleep 0.2
    done
    return 1
}
check_journal() {
    if wait_journal "$2" "$3"; then
        pass "$1"
    else
        fail "$1" "no line matching /$3/ in journalctl -u keter; last lines: $(journal_since "$2" | tail -n 5 | tr '\n' '|')"
    fi
}

# --- A client that never pauses ------------------------------------------------------------

declare -A client_pids=()
# client_start NAME HOST PATH TEXT: requests HOST's PATH in a loop inside the container, one
# new connection per request, until client_stop NAME. An answer is a failure unless it is 200
# with TEXT in the body.
client_start() {
    local name="$1" host="$2" path="$3" want="$4"
    in_ct mkdir -p /run/keter-test
    in_ct rm -f "/run/keter-test/$name.stop" "/run/keter-test/$name.result" "/run/keter-test/$name.failures"
    # shellcheck disable=SC2016 # expanded by the container's bash
    in_ct bash -c '
        name=$1 host=$2 path=$3 want=$4 ok=0 failed=0
        dir=/run/keter-test
        while [ ! -e "$dir/$name.stop" ]; do
            out="$(curl -s -m 10 -H "Host: $host" -w " %{http_code}" "http://127.0.0.1$path")"
            code="${out##* }"
            body="${out% *}"
            if [ "$code" = 200 ] && [[ "$body" == *"$want"* ]]; then
                ok=$((ok + 1))
            else
                failed=$((failed + 1))
                echo "$(date +%T.%N) $code ${body:0:120}" >>"$dir/$name.failures"
            fi
        done
        echo "$ok $failed" >"$dir/$name.result"' client "$name" "$host" "$path" "$want" &
    client_pids[$name]=$!
}
# client_stop NAME: stops the client and sets client_ok and client_failed; the first failed
# answers are in client_failures.
client_ok=0
client_failed=0
client_failures=""
client_stop() {
    local name="$1"
    in_ct touch "/run/keter-test/$name.stop"
    wait "${client_pids[$name]}" 2>/dev/null || true
    unset "client_pids[$name]"
    read -r client_ok client_failed < <(in_ct cat "/run/keter-test/$name.result" 2>/dev/null || echo "0 0")
    client_failures="$(in_ct head -n 5 "/run/keter-test/$name.failures" 2>/dev/null || true)"
}
