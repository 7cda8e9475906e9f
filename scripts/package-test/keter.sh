# shellcheck shell=bash
# Helpers of scripts/test-package that know keter and its package, sourced after lib.sh: the
# answers expected on port 80 and keter's journal lines for them, the unit's and Nginx's state
# as a user checks it, the status interface's address in the installed config, and what the
# example app says about itself.
# shellcheck disable=SC2154 # ROOT and the container's helpers come from the caller and lib.sh

# What should answer on port 80 now, by label: the app, the host, a path and a text its
# answer contains. Steps that deploy or delete apps edit it; each_app_answers asks all.
declare -A want_app=() want_host=() want_path=() want_text=()
expect() { want_app[$1]="$2" want_host[$1]="$3" want_path[$1]="$4" want_text[$1]="$5"; }
forget_app() {
    local label
    for label in "${!want_app[@]}"; do
        [ "${want_app[$label]}" = "$1" ] && unset "want_app[$label]" "want_host[$label]" \
            "want_path[$label]" "want_text[$label]"
    done
    return 0
}
expected_apps() { printf '%s\n' "${want_app[@]}" | sort -u; }
each_app_answers() { # each_app_answers WHEN
    local label
    for label in $(printf '%s\n' "${!want_app[@]}" | sort); do
        # Asked once the app's switch is in the journal: Nginx serves it by then.
        ANSWER_TRIES=30 check_answer \
            "$1: $label answers on port 80 (${want_host[$label]}${want_path[$label]})" \
            "${want_host[$label]}" "${want_path[$label]}" "${want_text[$label]}"
    done
}
# each_app_switched WHEN CURSOR: every expected app's switch is in the journal after CURSOR.
each_app_switched() {
    local app
    for app in $(expected_apps); do
        check_journal "$1: journalctl -u keter shows $app switched" "$2" \
            "(^|\] )$app: switched to deploy"
    done
}

# KillMode=mixed: on stop, SIGTERM goes to keter alone and keter stops its apps; systemd's
# final SIGKILL to what is left of the unit's cgroup must find nothing.
check_no_sigkill() { # check_no_sigkill WHEN CURSOR
    check_not "$1: systemd found nothing to SIGKILL (keter stopped its apps itself)" \
        grep -q 'Killing process .* with signal SIGKILL' < <(journal_since "$2")
}
keter_main_pid() { in_ct systemctl show -P MainPID keter 2>/dev/null || echo 0; }
nginx_master_pid() { in_ct cat /run/nginx.pid 2>/dev/null || true; }
keter_is_active() { [ "$(in_ct systemctl is-active keter 2>/dev/null)" = active ]; }
nginx_is_fine() {
    [ "$(in_ct systemctl is-active nginx 2>/dev/null)" = active ] && in_ct nginx -t -q 2>/dev/null
}
# The host's default site answers every host name nobody else serves.
default_site() { wait_answer "unknown.example.com" / "Welcome to nginx"; }
# Nginx logs every file its workers could not open: any such line means a silent 404.
nginx_saw_no_permission_error() {
    local lines
    lines="$(in_ct grep -E 'Permission denied|\[crit\]' /var/log/nginx/error.log || true)"
    [ -z "$lines" ] && return 0
    echo "$lines" | head -n 3 >&2
    return 1
}
# Whatever changed under /etc/nginx since the installation, except the package's own include
# (and its folder), which dpkg writes again on an upgrade.
nothing_new_in_etc_nginx() {
    local changed
    changed="$(in_ct find /etc/nginx -newer /root/installed.stamp \
        ! -path /etc/nginx/conf.d ! -path /etc/nginx/conf.d/keter.conf)"
    [ -z "$changed" ] && return 0
    echo "changed under /etc/nginx: $changed" >&2
    return 1
}
# The status interface's address in the installed config: HOST:PORT, unix:PATH or false.
status_address() {
    local v
    v="$(in_ct sed -n 's/^status:[[:space:]]*//p' /etc/keter/keter-config.yaml \
        | sed 's/[[:space:]]*#.*//' | tr -d "\"'")"
    case "$v" in
        "") echo 127.0.0.1:4080 ;;
        false) echo false ;;
        /*) echo "unix:$v" ;;
        */*) echo "unix:/etc/keter/$v" ;;
        *) echo "$v" ;;
    esac
}
# status_get USER PATH: succeeds when USER gets a 200 for PATH from the status interface.
status_get() {
    local address
    address="$(status_address)"
    case "$address" in
        false) return 1 ;;
        unix:*) as_user "$1" curl -sf -m 5 -o /dev/null --unix-socket "${address#unix:}" "http://keter$2" ;;
        *) as_user "$1" curl -sf -m 5 -o /dev/null "http://$address$2" ;;
    esac
}
# What the example app behind host $1 reports: its uid (/whoami: "Uid: real effective saved
# fs"), its pid.
app_uid() { get "$1" /whoami | sed -n 's/.*Uid: \([0-9]*\).*/\1/p'; }
app_pid() { get "$1" /pid | sed 's/ [0-9]*$//; s/ //g'; }
