#!/bin/bash
# bench.sh - side-by-side benchmark of NBD servers (nbdkit-compatible or not)
#
# Usage:  bench.sh SERVER...
#
# SERVER is either a built-in name
#     nbdkit-memory   nbdkit -f {LISTEN} memory {SIZE}
#     nbdkit-null     nbdkit -f {LISTEN} null {SIZE}
#     nbdkit-file     nbdkit -f {LISTEN} file {DISK}
#     qemu-nbd        qemu-nbd -f raw -t -e 4 --cache=writeback --aio=threads {QLISTEN} {DISK}
#     qemu-nbd-direct qemu-nbd -f raw -t -e 4 --cache=none --aio=threads {QLISTEN} {DISK}
#     nbd-server      nbd-server -C {CONF} -p {PIDFILE}   (config generated, export "bench")
# or  NAME='COMMAND TEMPLATE'  for any nbdkit-compatible server, e.g.
#     'mine=/path/to/our-server -f {LISTEN} memory {SIZE}'
# Placeholders: {LISTEN} -> "-U SOCK" (unix) or "-i HOST -p PORT" (tcp), i.e.
# nbdkit syntax; {SOCK} {HOST} {PORT} {DISK} {SIZE} are also available.
# The command must stay in the foreground (nbdkit: -f).  Append
# ':file' to a custom NAME (e.g. 'mine:file=... file {DISK}') to have the
# backing file's page cache warmed before each start.
#
# Environment knobs (defaults in brackets):
#   REPS [3]            repetitions; the server order rotates every repetition
#   RUNTIME [5]         seconds per fio job (time_based, no ramp)
#   SIZE [4G]           disk size of every server and of the copy images
#   TRANSPORTS ["unix tcp"]
#   FIO_TESTS, COPY_TESTS   subsets of the test names below
#   COPY_SINK [null:]   nbdcopy destination for copy-out (null: or /dev/null)
#   STARTUP_N [10]      extra start/stop cycles per server for startup stats
#   WORK [/tmp/nbdbench]  images + sockets;  OUT [$WORK/results-DATE]
#   HOST [127.0.0.1]  PORT_BASE [20809]
#   PERF_STAT [auto]    also record context switches with `perf stat -p`
#   NICE []             run everything (servers, fio, nbdcopy) at this nice
#                       level, e.g. NICE=-10 on a machine shared with builds
#   PIN [auto]          pin the server and the client to separate cores with
#                       taskset (the same pinning for every server): auto = on
#                       with 2 or more CPUs; PIN=0 turns it off
#   SERVER_CPUS [1] CLIENT_CPUS [0]   the taskset -c lists used when pinned
#   NOISE_MAX [] NOISE_RETRIES [1]  if set, a test during which other
#                       processes used more than NOISE_MAX cores is repeated
#                       (up to NOISE_RETRIES times); the least noisy is kept
#
# Per server and transport one server instance runs:
#   copy-in-sparse  nbdcopy sparse.img -> server   (25 % data, 75 % holes)
#   copy-out-sparse nbdcopy server -> null:        (extents honoured)
#   copy-in-full    nbdcopy full.img -> server     (100 % data)
#   copy-out-full   nbdcopy server -> null:
#   seq-read-1M-qd16-1c   seq-read-1M-qd16-4c  (4 connections x QD16 = 64)
#   seq-write-1M-qd16-1c  seq-write-1M-qd16-4c
#   rand-read-4k-qd1      rand-read-4k-qd32
#   rand-write-4k-qd1     rand-write-4k-qd32
# For every test the server's CPU time (utime+stime of its whole process tree
# from /proc, see lib/proc.py) is sampled before and after.  Outputs:
#   $OUT/results.tsv  $OUT/rss.tsv  $OUT/startup.tsv  $OUT/summary.md
set -euo pipefail
if [ -n "${NICE:-}" ] && [ -z "${BENCH_NICED:-}" ]; then
    BENCH_NICED=1 exec nice -n "$NICE" "$0" "$@"
fi

HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-/usr/bin/python3}
REPS=${REPS:-3}
RUNTIME=${RUNTIME:-5}
SIZE=${SIZE:-4G}
TRANSPORTS=${TRANSPORTS:-"unix tcp"}
FIO_TESTS=${FIO_TESTS:-"seq-read-1M-qd16-1c seq-read-1M-qd16-4c seq-write-1M-qd16-1c seq-write-1M-qd16-4c rand-read-4k-qd1 rand-read-4k-qd32 rand-write-4k-qd1 rand-write-4k-qd32"}
COPY_TESTS=${COPY_TESTS:-"copy-in-sparse copy-out-sparse copy-in-full copy-out-full"}
COPY_SINK=${COPY_SINK:-null:}
STARTUP_N=${STARTUP_N:-10}
WORK=${WORK:-/tmp/nbdbench}
OUT=${OUT:-$WORK/results-$(date +%Y%m%d-%H%M%S)}
HOST=${HOST:-127.0.0.1}
PORT_BASE=${PORT_BASE:-20809}
PERF_STAT=${PERF_STAT:-auto}
NOISE_MAX=${NOISE_MAX:-}
NOISE_RETRIES=${NOISE_RETRIES:-1}
PIN=${PIN:-auto}
SERVER_CPUS=${SERVER_CPUS:-1}
CLIENT_CPUS=${CLIENT_CPUS:-0}
if [ "$PIN" = auto ]; then
    if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then PIN=1; else PIN=0; fi
fi
SRV_PIN=(); CLI_PIN=()
if [ "$PIN" = 1 ]; then
    SRV_PIN=(taskset -c "$SERVER_CPUS"); CLI_PIN=(taskset -c "$CLIENT_CPUS")
    # cores the client may use: its verdict is "client-bound" at >= 95 % of them
    CLIENT_CORES=$(taskset -c "$CLIENT_CPUS" nproc)
else
    CLIENT_CORES=$(nproc)
fi

[ $# -ge 1 ] || { sed -n '2,40p' "$0"; exit 2; }
SIZE_B=$(numfmt --from=iec "$SIZE")
QUARTER=$((SIZE_B / 4))
DISK=$WORK/disk.img
mkdir -p "$WORK" "$OUT/fio" "$OUT/log"
: > "$OUT/pids"
PORT=$PORT_BASE

die() { echo "bench.sh: $*" >&2; exit 1; }
log() { echo "[$(date +%T)] $*" >&2; }

for t in fio nbdcopy /usr/bin/time numfmt; do
    command -v "$t" >/dev/null || die "missing $t"
done
fio --enghelp 2>/dev/null | grep -qw nbd || die "fio lacks the nbd ioengine"
"$PY" -c 'import nbd' 2>/dev/null || log "note: $PY has no libnbd bindings (not needed by bench.sh)"
if [ "$PERF_STAT" = auto ]; then
    if perf stat -e task-clock,context-switches true >/dev/null 2>&1; then PERF_STAT=1; else PERF_STAT=0; fi
fi

# ---------------------------------------------------------------- servers
declare -A CUSTOM
for spec in "$@"; do
    case "$spec" in *=*) CUSTOM[${spec%%=*}]=${spec#*=} ;; esac
done
NAMES=()
for spec in "$@"; do NAMES+=("${spec%%=*}"); done

server_def() {  # NAME -> S_CMD S_EXPORT S_PIDFILE S_WARM S_CONF
    S_EXPORT=""; S_PIDFILE=0; S_WARM=0; S_CONF=0
    case "$1" in
    nbdkit-memory)   S_CMD="nbdkit -f {LISTEN} memory {SIZE}" ;;
    nbdkit-null)     S_CMD="nbdkit -f {LISTEN} null {SIZE}" ;;
    nbdkit-file)     S_CMD="nbdkit -f {LISTEN} file {DISK}"; S_WARM=1 ;;
    qemu-nbd)        S_CMD="qemu-nbd -f raw -t -e 4 --cache=writeback --aio=threads {QLISTEN} {DISK}"; S_WARM=1 ;;
    qemu-nbd-direct) S_CMD="qemu-nbd -f raw -t -e 4 --cache=none --aio=threads {QLISTEN} {DISK}"; S_WARM=1 ;;
    nbd-server)      S_CMD="nbd-server -C {CONF} -p {PIDFILE}"; S_EXPORT=bench; S_PIDFILE=1; S_WARM=1; S_CONF=1 ;;
    *)  [ -n "${CUSTOM[$1]:-}" ] || die "unknown server '$1'"
        S_CMD=${CUSTOM[$1]}
        case "$1" in *:file) S_WARM=1 ;; esac ;;
    esac
}

SPID=""
start_server() {  # NAME TRANSPORT -> SPID URI T_ACCEPT T_GREET
    local name=$1 tr=$2 sock="$WORK/nbd.sock" listen qlisten cmd conf pidf
    server_def "$name"
    PORT=$((PORT + 1))
    conf="$WORK/nbd-server.conf"; pidf="$WORK/server.pid"
    if [ "$tr" = unix ]; then
        listen="-U $sock"; qlisten="-k $sock"
        URI="nbd+unix:///$S_EXPORT?socket=$sock"
        set -- --unix "$sock"
    else
        listen="-i $HOST -p $PORT"; qlisten="-b $HOST -p $PORT"
        URI="nbd://$HOST:$PORT/$S_EXPORT"
        set -- --tcp "$HOST:$PORT"
    fi
    if [ "$S_CONF" = 1 ]; then
        {   echo "[generic]"
            if [ "$tr" = unix ]; then echo "    unixsock = $sock"
            else echo "    listenaddr = $HOST"; echo "    port = $PORT"; fi
            echo "[bench]"
            echo "    exportname = $DISK"
        } > "$conf"
    fi
    [ "$S_PIDFILE" = 1 ] && set -- "$@" --pidfile "$pidf"
    if [ "$S_WARM" = 1 ] && [ "${NO_WARM:-0}" = 0 ]; then cat "$DISK" > /dev/null; fi
    cmd=$S_CMD
    cmd=${cmd//\{LISTEN\}/$listen}; cmd=${cmd//\{QLISTEN\}/$qlisten}
    cmd=${cmd//\{SOCK\}/$sock};     cmd=${cmd//\{HOST\}/$HOST}
    cmd=${cmd//\{PORT\}/$PORT};     cmd=${cmd//\{DISK\}/$DISK}
    cmd=${cmd//\{SIZE\}/$SIZE};     cmd=${cmd//\{CONF\}/$conf}
    cmd=${cmd//\{PIDFILE\}/$pidf}
    local -a argv; read -ra argv <<< "$cmd"
    argv=("${SRV_PIN[@]}" "${argv[@]}")
    echo "$name $tr: $cmd" >> "$OUT/commands.txt"
    local r; r=$("$PY" "$HERE/lib/launch.py" "$@" --log "$OUT/log/$name-$tr.log" -- "${argv[@]}") \
        || die "could not start $name ($cmd)"
    read -r SPID T_ACCEPT T_GREET <<< "$r"
    echo "$SPID" >> "$OUT/pids"
}

stop_server() {
    [ -n "$SPID" ] || return 0
    local tree p i
    tree=$("$PY" "$HERE/lib/proc.py" --tree "$SPID" 2>/dev/null || true)
    kill -TERM "$SPID" 2>/dev/null || true
    for i in $(seq 100); do kill -0 "$SPID" 2>/dev/null || break; sleep 0.1; done
    for p in $tree; do kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null; done || true
    SPID=""
}
cleanup() {
    local p
    stop_server || true
    [ -f "$OUT/pids" ] && while read -r p; do kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null; done < "$OUT/pids"
    rm -f "$WORK/nbd.sock"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cpu_of() { "$PY" "$HERE/lib/proc.py" "$SPID" | cut -d' ' -f1; }
# machine-wide CPU seconds from /proc/stat: "USER+NICE+SYSTEM IRQ+SOFTIRQ STEAL".
# bg_cpu_s = process time (user+system) of everything except the server and
# the client during a test: other processes and kernel threads (writeback...).
# irq_cpu_s = hard+soft irq time: not charged to any process with this
# kernel's tick accounting; on TCP loopback it is the packet receive path.
sys_busy() { awk -v hz="$(getconf CLK_TCK)" '/^cpu /{printf "%.2f %.2f %.2f", ($2+$3+$4)/hz, ($7+$8)/hz, $9/hz}' /proc/stat; }
bg_of() {  # "U0 I0 S0" "U1 I1 S1" SRV CLI -> "BG IRQ STEAL"
    echo "$1 $2 $3 $4" | awk '{printf "%.2f\t%.2f\t%.2f", ($4-$1)-$7-$8, $5-$2, $6-$3}'
}

perf_start() {
    PERF_PID=""
    [ "$PERF_STAT" = 1 ] || return 0
    perf stat -x, -o "$OUT/perf.tmp" -e task-clock,context-switches -p "$SPID" 2>/dev/null &
    PERF_PID=$!
    sleep 0.1
}
perf_stop() {  # -> CTXSW
    CTXSW=NA
    [ -n "$PERF_PID" ] || return 0
    kill -INT "$PERF_PID" 2>/dev/null || true
    wait "$PERF_PID" 2>/dev/null || true
    CTXSW=$(awk -F, '$3=="context-switches"{print $1}' "$OUT/perf.tmp" 2>/dev/null || echo NA)
    [ -n "$CTXSW" ] || CTXSW=NA
}

fio_args() {
    local r="--randrepeat=0 --norandommap"
    case "$1" in
    seq-read-1M-qd16-1c)  echo "--rw=read --bs=1M --iodepth=16 --numjobs=1" ;;
    seq-read-1M-qd16-4c)  echo "--rw=read --bs=1M --iodepth=16 --numjobs=4 --size=$QUARTER --offset_increment=$QUARTER" ;;
    seq-write-1M-qd16-1c) echo "--rw=write --bs=1M --iodepth=16 --numjobs=1" ;;
    seq-write-1M-qd16-4c) echo "--rw=write --bs=1M --iodepth=16 --numjobs=4 --size=$QUARTER --offset_increment=$QUARTER" ;;
    rand-read-4k-qd1)     echo "--rw=randread --bs=4k --iodepth=1 --numjobs=1 $r" ;;
    rand-read-4k-qd32)    echo "--rw=randread --bs=4k --iodepth=32 --numjobs=1 $r" ;;
    rand-write-4k-qd1)    echo "--rw=randwrite --bs=4k --iodepth=1 --numjobs=1 $r" ;;
    rand-write-4k-qd32)   echo "--rw=randwrite --bs=4k --iodepth=32 --numjobs=1 $r" ;;
    *) die "unknown fio test $1" ;;
    esac
}

# results.tsv columns
printf 'server\ttransport\trep\ttest\tbytes\tsecs\tmibs\tiops\tp50_us\tp99_us\tlat_us\tsrv_cpu_s\tcli_cpu_s\tctxsw\tbg_cpu_s\tirq_cpu_s\tsteal_s\twindow_ms\n' > "$OUT/results.tsv"
printf 'server\ttransport\trep\trss_idle_kib\trss_end_kib\thwm_kib\tnprocs\tpeak_tree_rss_kib\n' > "$OUT/rss.tsv"
printf 'server\ttransport\tsample\taccept_ms\tgreeting_ms\n' > "$OUT/startup.tsv"

emit() {  # sets ROW (tab separated) and BGC (other processes' CPU, in cores)
    local IFS=$'\t'; ROW="$*"
    BGC=$(echo "$ROW" | awk -F'\t' '{b=$15; w=$18; if (w > 0) printf "%.3f", (b < 0 ? 0 : b) / (w / 1000); else print 0}')
}
run_test() {  # KIND(fio|copy) NAME TR REP TEST: run, retry while too noisy, append the least noisy row
    local kind=$1 a best="" bestbg=""; shift
    for a in $(seq 0 "$NOISE_RETRIES"); do
        "run_$kind" "$@"
        if [ -z "$best" ] || awk -v x="$BGC" -v y="$bestbg" 'BEGIN{exit !(x < y)}'; then
            best=$ROW; bestbg=$BGC
        fi
        [ -n "$NOISE_MAX" ] || break
        awk -v x="$BGC" -v m="$NOISE_MAX" 'BEGIN{exit !(x <= m)}' && break
        log "  $1/$2 $4: other processes used $BGC cores (> $NOISE_MAX), repeating"
    done
    echo "$best" >> "$OUT/results.tsv"
}

run_fio() {  # NAME TR REP TEST
    local name=$1 tr=$2 rep=$3 test=$4 tag="$1-$2-$3-$4" c0 c1 tm parsed b0 b1 sc w0 w1
    c0=$(cpu_of); perf_start; b0=$(sys_busy); w0=$(date +%s%N)
    # shellcheck disable=SC2046
    /usr/bin/time -f '%e %U %S' -o "$OUT/fio/$tag.time" \
        "${CLI_PIN[@]}" fio --name="$test" --ioengine=nbd --uri="$URI" --thread --time_based \
            --runtime="$RUNTIME" --group_reporting --lat_percentiles=1 --output-format=json \
            --output="$OUT/fio/$tag.json" $(fio_args "$test") \
            > /dev/null 2>> "$OUT/log/fio.err" || die "fio $tag failed"
    w1=$(date +%s%N); b1=$(sys_busy); perf_stop; c1=$(cpu_of)
    parsed=$("$PY" "$HERE/lib/fioparse.py" "$OUT/fio/$tag.json")
    tm=$(awk '{printf "%.2f", $2+$3}' "$OUT/fio/$tag.time")
    sc=$(awk -v a="$c0" -v b="$c1" 'BEGIN{printf "%.2f", b-a}')
    read -r b s m i p50 p99 lat <<< "$parsed"
    emit "$name" "$tr" "$rep" "$test" "$b" "$s" "$m" "$i" "$p50" "$p99" "$lat" \
         "$sc" "$tm" "$CTXSW" "$(bg_of "$b0" "$b1" "$sc" "$tm")" "$(( (w1 - w0) / 1000000 ))"
}

run_copy() {  # NAME TR REP TEST
    local name=$1 tr=$2 rep=$3 test=$4 tag="$1-$2-$3-$4" c0 c1 src dst b0 b1 sc tm w0 w1
    case "$test" in
    copy-in-sparse)  src=$WORK/sparse.img; dst=$URI ;;
    copy-in-full)    src=$WORK/full.img;   dst=$URI ;;
    copy-out-sparse|copy-out-full) src=$URI; dst=$COPY_SINK ;;
    *) die "unknown copy test $test" ;;
    esac
    c0=$(cpu_of); perf_start; b0=$(sys_busy); w0=$(date +%s%N)
    /usr/bin/time -f '%e %U %S' -o "$OUT/fio/$tag.time" "${CLI_PIN[@]}" nbdcopy "$src" "$dst" \
        2>> "$OUT/log/nbdcopy.err" || die "nbdcopy $tag failed"
    w1=$(date +%s%N); b1=$(sys_busy); perf_stop; c1=$(cpu_of)
    read -r e u s < "$OUT/fio/$tag.time"
    sc=$(awk -v a="$c0" -v b="$c1" 'BEGIN{printf "%.2f", b-a}')
    tm=$(awk -v u="$u" -v s="$s" 'BEGIN{printf "%.2f", u+s}')
    emit "$name" "$tr" "$rep" "$test" "$SIZE_B" "$e" \
         "$(awk -v b="$SIZE_B" -v e="$e" 'BEGIN{printf "%.1f", b/e/1048576}')" NA NA NA NA \
         "$sc" "$tm" "$CTXSW" "$(bg_of "$b0" "$b1" "$sc" "$tm")" "$(( (w1 - w0) / 1000000 ))"
}

# ---------------------------------------------------------------- main
log "images in $WORK (SIZE=$SIZE)"
"$PY" "$HERE/lib/mkimages.py" "$WORK" "$SIZE_B"
cat "$WORK/full.img" "$WORK/sparse.img" > /dev/null   # warm the page cache
sync
{   echo "date: $(date -Is)"; echo "host: $(uname -a)"; echo "cpus: $(nproc)"
    echo "REPS=$REPS RUNTIME=$RUNTIME SIZE=$SIZE TRANSPORTS='$TRANSPORTS' COPY_SINK=$COPY_SINK PERF_STAT=$PERF_STAT NICE=${NICE:-} NOISE_MAX=$NOISE_MAX NOISE_RETRIES=$NOISE_RETRIES"
    echo "nice: $(nice)"
    echo "pin: $PIN server_cpus=$SERVER_CPUS client_cpus=$CLIENT_CPUS"
    echo "client_cores: $CLIENT_CORES"
    echo "servers: ${NAMES[*]}"
    nbdkit --version 2>/dev/null | head -1 || true
    qemu-nbd --version 2>/dev/null | head -1 || true
    fio --version; nbdcopy --version 2>/dev/null | head -1 || true
} > "$OUT/env.txt"

n=${#NAMES[@]}
for rep in $(seq 1 "$REPS"); do
    for k in $(seq 0 $((n - 1))); do
        name=${NAMES[$(( (k + rep - 1) % n ))]}
        for tr in $TRANSPORTS; do
            start_server "$name" "$tr"
            printf '%s\t%s\trun%s\t%s\t%s\n' "$name" "$tr" "$rep" "$T_ACCEPT" "$T_GREET" >> "$OUT/startup.tsv"
            read -r _ rss0 _ _ <<< "$("$PY" "$HERE/lib/proc.py" "$SPID")"
            log "rep $rep $name/$tr pid $SPID ready in ${T_ACCEPT} ms"
            rm -f "$OUT/peak.tmp"
            "$PY" "$HERE/lib/proc.py" --watch "$SPID" "$OUT/peak.tmp" 0.5 & WATCH_PID=$!
            for t in $COPY_TESTS; do run_test copy "$name" "$tr" "$rep" "$t"; done
            for t in $FIO_TESTS; do run_test fio "$name" "$tr" "$rep" "$t"; done
            sleep 0.3   # let per-connection children be reaped
            read -r _ rss1 hwm np <<< "$("$PY" "$HERE/lib/proc.py" "$SPID")"
            kill -TERM "$WATCH_PID" 2>/dev/null || true; wait "$WATCH_PID" 2>/dev/null || true
            peak=$(cat "$OUT/peak.tmp" 2>/dev/null || echo NA)
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$tr" "$rep" "$rss0" "$rss1" "$hwm" "$np" "$peak" >> "$OUT/rss.tsv"
            stop_server
            sync   # push dirty pages of file-backed servers out before the next one
        done
    done
done

if [ "$STARTUP_N" -gt 0 ]; then
    log "startup cycles ($STARTUP_N per server)"
    for i in $(seq 1 "$STARTUP_N"); do
        for name in "${NAMES[@]}"; do
            NO_WARM=1 start_server "$name" unix
            printf '%s\t%s\t%s\t%s\t%s\n' "$name" unix "$i" "$T_ACCEPT" "$T_GREET" >> "$OUT/startup.tsv"
            stop_server
        done
    done
fi

"$PY" "$HERE/lib/summarize.py" "$OUT" | tee "$OUT/summary.md"
log "results in $OUT"
