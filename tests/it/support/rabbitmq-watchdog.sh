#!/bin/sh
# Watchdog for one test RabbitMQ node (see amqp.rs). Runs in its own process
# group, so neither Ctrl-C nor nextest's per-test kill reaches it.
#
# Args: KEY_DIR NODE_DIR GRACE_SECS EPMD_PID SERVER_PID
#
# KEY_DIR holds `lock` (flock'ed by everyone touching `state`), `state` (the
# node that test processes attach to, written by the starter once the node is
# ready) and `leases/<pid>` (one per test process using the node). Once no
# lease names a live process for more than GRACE_SECS seconds, the watchdog
# (holding the lock) removes `state`, kills the broker and epmd and deletes
# NODE_DIR; the last node of a KEY_DIR also deletes KEY_DIR. SIGTERM stops the
# node right away (the starter uses it when startup fails).
set -u
key_dir=$1 node_dir=$2 grace=$3 epmd=$4 server=$5

# Alive and not a zombie (a zombie's parent may be a still-running test).
alive() {
    s=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1)
    [ -n "$s" ] && [ "$s" != Z ] && [ "$s" != X ]
}

ours() { grep -qx "watchdog=$$" "$key_dir/state" 2>/dev/null; }

live_leases() {
    n=0
    for f in "$key_dir"/leases/*; do
        [ -e "$f" ] || continue
        if alive "${f##*/}"; then n=$((n + 1)); else rm -f "$f"; fi
    done
    [ "$n" -gt 0 ]
}

stop_node() {
    # A throwaway node: no need for RabbitMQ's (slow) graceful shutdown.
    kill -KILL "$server" 2>/dev/null
    kill -TERM "$epmd" 2>/dev/null
    rm -rf "$node_dir" 2>/dev/null || { sleep 1; rm -rf "$node_dir"; }
}

trap 'stop_node; exit 0' TERM INT HUP

idle=0
down=0
while :; do
    # Interruptible by the trap, unlike a plain foreground sleep.
    sleep 1 &
    wait $!
    if [ "$down" = 0 ] && ! alive "$server"; then
        echo "$(date) rabbitmq node $server exited on its own"
        down=1
        exec 9<>"$key_dir/lock"
        flock 9
        if ours; then rm -f "$key_dir/state"; fi
        exec 9>&-
        kill -TERM "$epmd" 2>/dev/null
    fi
    if live_leases; then idle=0; continue; fi
    idle=$((idle + 1))
    [ "$idle" -gt "$grace" ] || continue
    exec 9<>"$key_dir/lock"
    flock 9
    if live_leases; then exec 9>&-; idle=0; continue; fi
    if ours; then rm -f "$key_dir/state"; fi
    stop_node
    if [ ! -e "$key_dir/state" ] && ! ls -d "$key_dir"/node-* >/dev/null 2>&1; then
        rm -rf "$key_dir"
    fi
    exit 0
done
