# Sourced by the benchmark scripts: one worker and one router on 127.0.0.1, started and stopped.
# Needs $bin (the binaries' folder) and $out (where the logs go).
#   serve NAME MODEL [WORKER FLAGS...]   returns once the router answers on http://127.0.0.1:8211
#   stop                                 stops both, if running
cluster_router=http://127.0.0.1:8211

stop() {
    kill $(jobs -p) 2>/dev/null || true
    wait 2>/dev/null || true
}

serve() {
    local name=$1 model=$2
    shift 2
    stop
    $bin/onehead-worker serve --model "$model" --listen 127.0.0.1:50181 --max-batch-size 32 "$@" \
        >"$out/worker-$name.log" 2>&1 &
    $bin/onehead-router --listen 127.0.0.1:8211 --worker http://127.0.0.1:50181 >"$out/router-$name.log" 2>&1 &
    for _ in $(seq 240); do
        if $bin/onehead-router client --addr "$cluster_router" info >/dev/null 2>&1; then return; fi
        sleep 0.5
    done
    echo "the cluster did not come up in 2 minutes; see $out/worker-$name.log" >&2
    exit 1
}
