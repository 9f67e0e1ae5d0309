#!/usr/bin/env bash
# Soak: one router and two workers on builtin:tiny, on free ports of 127.0.0.1, under
# onehead-bench at a steady request rate for DURATION seconds, while the client cancels a share
# of the requests at a random token and sends another share with a short random deadline. Every
# 10 s it samples the resident memory (VmRSS) and open file descriptors of the three servers
# into a CSV. At the end it compares each server's sample after warm-up with its last sample
# under load, counts the request outcomes, and stops the servers with SIGTERM.
#
#   bash scripts/soak.sh [DURATION]   seconds of load (default 1800, or $SOAK_SECS)
#
#   SOAK_RATE          requests a second, Poisson arrivals (default 8)
#   SOAK_CANCEL        fraction the client cancels after a random number of tokens (default 0.1)
#   SOAK_DEADLINE      fraction sent with a deadline (default 0.1) ...
#   SOAK_DEADLINE_MS   ... drawn from LOW:HIGH ms (default 20:400)
#   SOAK_PROFILE       release (default; builds as scripts/run.sh does) or debug (the binaries of
#                      `cargo build --workspace --bins`, what scripts/test.sh builds)
#   SOAK_DIR           where the CSV, the logs and the bench's results go (default: a new folder
#                      under /tmp, kept)
#   SOAK_WORKER_B_ENV  NAME=VALUE words for worker b only, to compare a setting against worker a
#                      under the same load (for example MALLOC_ARENA_MAX=1)
#
# Warm-up is the first 20% of the run: the baseline is the first sample at or after
# DURATION / 5 s of load. Exits 1 when a request failed (other than those the client cancelled
# or whose deadline it set passed), when a server died or did not stop cleanly on SIGTERM, or,
# for runs of 600 s or more, when a server's RSS or fd count grew by 5% or more from the
# baseline to the end. A shorter run (CI's 60 s) reports growth but does not judge it: its
# baseline comes seconds into the load, while allocators, connection pools and the KV pool's
# touched pages are still filling, so its growth is start-up, not a leak.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

duration=${1:-${SOAK_SECS:-1800}}
rate=${SOAK_RATE:-8}
cancel=${SOAK_CANCEL:-0.1}
deadline=${SOAK_DEADLINE:-0.1}
deadline_ms=${SOAK_DEADLINE_MS:-20:400}
profile=${SOAK_PROFILE:-release}
interval=10
[[ $duration =~ ^[0-9]+$ && $duration -ge 20 ]] || { echo "soak: DURATION must be whole seconds, at least 20" >&2; exit 2; }
dir=${SOAK_DIR:-$(mktemp -d /tmp/onehead-soak.XXXXXX)}
mkdir -p "$dir"

bash scripts/setup-libtorch.sh
case $profile in
    release)
        cargo build --release --locked -p onehead-worker -p onehead-router -p onehead-loadgen --bins
        bin=target/release ;;
    # The same command as scripts/test.sh, so that after it nothing is rebuilt.
    debug)
        cargo build --workspace --bins --locked
        bin=target/debug ;;
    *) echo "soak: SOAK_PROFILE must be release or debug, not $profile" >&2; exit 2 ;;
esac

pids=()
sampler=
bench=
stop_all() {
    [[ -n $sampler ]] && kill "$sampler" 2>/dev/null
    [[ -n $bench ]] && kill "$bench" 2>/dev/null
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap stop_all EXIT
trap 'exit 130' INT TERM

# start NAME ARGS...: starts a server with --listen 127.0.0.1:0, waits for the address it prints.
start() {
    local name=$1 log=$dir/$1.log
    shift
    NO_COLOR=1 "$@" --listen 127.0.0.1:0 --shutdown-grace-secs 10 >"$log" 2>&1 &
    pids+=($!)
    for _ in $(seq 600); do
        addr=$(sed -n 's/^listening on //p' "$log" | head -1)
        [[ -n $addr ]] && return
        kill -0 "${pids[-1]}" 2>/dev/null || break
        sleep 0.2
    done
    echo "soak: $name did not start; its log ($log):" >&2
    tail -20 "$log" >&2
    exit 1
}

names=(router worker_a worker_b)
start worker_a $bin/onehead-worker serve --model builtin:tiny --threads 1
worker_a=$addr
# shellcheck disable=SC2086 # SOAK_WORKER_B_ENV is a list of NAME=VALUE words.
start worker_b env ${SOAK_WORKER_B_ENV:-} $bin/onehead-worker serve --model builtin:tiny --threads 1
worker_b=$addr
start router $bin/onehead-router --worker "http://$worker_a,http://$worker_b"
router=http://$addr
# pids is in start order (worker_a, worker_b, router); the CSV's is router first.
procs=("${pids[2]}" "${pids[0]}" "${pids[1]}")
healthy() { [[ $($bin/onehead-router client --addr "$router" info 2>&1 || true) == *"healthy_workers: 2,"* ]]; }
for _ in $(seq 150); do healthy && break; sleep 0.2; done
healthy || { echo "soak: the router does not see two healthy workers" >&2; exit 1; }

# sample SECS PHASE: one CSV row of each server's VmRSS, open fds and CPU seconds so far (user
# and system); a process that is gone (or a zombie) has empty fields.
ticks=$(getconf CLK_TCK)
sample() {
    local row="$1,$2" pid rss fds cpu
    for pid in "${procs[@]}"; do
        rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
        fds= cpu=
        if [[ -n $rss ]]; then
            fds=$(ls "/proc/$pid/fd" 2>/dev/null | wc -l || true)
            # Fields 14 and 15 of /proc/PID/stat, counted after the command name's ")".
            cpu=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | awk -v t="$ticks" '{printf "%.1f", ($12 + $13) / t}' || true)
        fi
        row+=",$rss,$fds,$cpu"
    done
    echo "$row" >>"$dir/samples.csv"
}
header=secs,phase
for name in "${names[@]}"; do header+=",${name}_rss_kib,${name}_fds,${name}_cpu_s"; done
echo "$header" >"$dir/samples.csv"

n_prompts=$(awk -v r="$rate" -v d="$duration" 'BEGIN {printf "%d", r * d}')
cat <<MSG
soak: $duration s at $rate requests/s ($n_prompts requests, 64-192 prompt and 32-96 generated tokens),
      ${cancel} cancelled by the client, ${deadline} with a deadline of $deadline_ms ms;
      router $router -> workers $worker_a, $worker_b ($profile build); files in $dir
MSG
started=$(date +%s)
sample 0 before
# A request still out 120 s after the last arrival is cancelled by the bench and counted failed.
$bin/onehead-bench --address "$router" --request-rate "$rate" --num-prompts "$n_prompts" \
    --input-len 128 --output-len 64 --range-ratio 0.5 --seed 1 --warmup-requests 2 \
    --cancel-fraction "$cancel" --deadline-fraction "$deadline" --deadline-ms "$deadline_ms" \
    --max-duration-secs $((duration + 120)) --disable-progress --result-file "$dir/bench.json" \
    >"$dir/bench.txt" 2>"$dir/bench.log" &
bench=$!
(
    while sleep $interval; do
        kill -0 "$bench" 2>/dev/null || break
        sample $(($(date +%s) - started)) load
    done
) &
sampler=$!
bench_rc=0
wait "$bench" || bench_rc=$?
bench=
kill "$sampler" 2>/dev/null || true
wait "$sampler" 2>/dev/null || true
sampler=
sleep 2
sample $(($(date +%s) - started)) after
elapsed=$(($(date +%s) - started))

verdict=0
echo
cat "$dir/bench.txt"
[[ $bench_rc -eq 0 ]] || { echo "soak: FAIL: onehead-bench exited $bench_rc; see $dir/bench.log" >&2; verdict=1; }
count() { awk -F':' -v label="$1" '$1 == label {gsub(/ /, "", $2); print $2}' "$dir/bench.txt"; }
completed=$(count "Successful requests")
cancelled=$(count "Cancelled by the client")
deadlined=$(count "Deadline exceeded (client's deadline)")
failed=$(count "Failed requests")

# Liveness before the stop: each server's last sample under load and the one after it.
dead=()
for idx in 0 1 2; do
    [[ -n $(tail -1 "$dir/samples.csv" | cut -d, -f$((3 + 3 * idx))) ]] || dead+=("${names[$idx]}")
done

# A clean stop: SIGTERM, then exit status 0 within the grace period and a little more.
unclean=()
kill -TERM "${procs[@]}" 2>/dev/null || true
for idx in 0 1 2; do
    pid=${procs[$idx]} rc=0
    for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        unclean+=("${names[$idx]} (still running 15 s after SIGTERM)")
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || rc=$?
    [[ $rc -eq 0 || $rc -eq 137 ]] || unclean+=("${names[$idx]} (exit $rc)")
done
pids=()

echo
echo "soak: $elapsed s in all; request outcomes: $completed completed, $cancelled cancelled by the client," \
    "$deadlined past the client's deadline, $failed failed"
judge=$([[ $duration -ge 600 ]] && echo 1 || echo 0)
warmup=$((duration / 5))
growth=$(awk -F, -v warmup="$warmup" -v judge="$judge" '
    NR == 1 { for (i = 3; i <= NF; i++) col[i] = $i; ncol = NF; next }
    $2 == "before" { first = $0 }
    $2 == "load" && base == "" && $1 >= warmup { base = $0 }
    $2 == "load" { last = $0 }
    END {
        if (base == "") { print "no sample under load at or after " warmup " s"; exit }
        split(first, f, ","); split(base, b, ","); split(last, e, ",")
        printf "%-18s %12s %12s %12s %8s\n", "", "at start", "warm-up", "end", "growth"
        printf "%-18s %12s %12s %12s %8s\n", "", "(0 s)", "(" b[1] " s)", "(" e[1] " s)", ""
        for (i = 3; i <= ncol; i++) {
            if (col[i] ~ /_cpu_s$/) {
                if (e[i] != "") cpu = cpu sprintf(" %s %.0f%%,", substr(col[i], 1, length(col[i]) - 6), (e[i] - f[i]) * 100 / (e[1] - f[1]))
                continue
            }
            if (b[i] == "" || e[i] == "") { printf "%-18s %12s %12s %12s %8s\n", col[i], f[i], b[i], e[i], "gone"; continue }
            g = (e[i] - b[i]) * 100 / b[i]
            printf "%-18s %12d %12d %12d %7.1f%%\n", col[i], f[i], b[i], e[i], g
            if (g >= 5) grew = grew " " col[i]
        }
        sub(/,$/, "", cpu)
        print "CPU under load, of one core:" cpu
        if (grew != "" && judge) printf "GROWTH:%s\n", grew
        else if (grew != "") printf "growth of 5%% or more in%s (not judged: the run is under 600 s)\n", grew
    }' "$dir/samples.csv")
echo "$growth" | sed 's/^GROWTH:/grew by 5% or more:/'

[[ -n $failed && $failed -eq 0 ]] || { echo "soak: FAIL: $failed requests failed (see Errors above)" >&2; verdict=1; }
[[ ${#dead[@]} -eq 0 ]] || { echo "soak: FAIL: died during the run: ${dead[*]}" >&2; verdict=1; }
[[ ${#unclean[@]} -eq 0 ]] || { echo "soak: FAIL: did not stop cleanly: ${unclean[*]}" >&2; verdict=1; }
grep -q '^GROWTH:' <<<"$growth" && { echo "soak: FAIL: memory or descriptors grew by 5% or more" >&2; verdict=1; }
for name in "${names[@]}"; do
    n=$(grep -cE 'ERROR|WARN|panicked' "$dir/$name.log" || true)
    [[ $n -eq 0 ]] || echo "soak: $name logged $n warnings or errors, the first:" \
        "$(grep -m1 -E 'ERROR|WARN|panicked' "$dir/$name.log" | sed 's/\x1b\[[0-9;]*m//g')"
done
echo "soak: samples in $dir/samples.csv, results in $dir/bench.json, logs in $dir"
[[ $verdict -eq 0 ]] && echo "soak: PASS" || echo "soak: FAIL"
exit $verdict
