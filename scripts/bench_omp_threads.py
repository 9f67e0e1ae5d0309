"""Why onehead's engine runs on the thread that loaded the model (worker/src/engine.rs).

LibTorch's OpenMP keeps one team of threads per thread that starts parallel regions. Once a
second thread starts them, the process manages more OpenMP threads than there are cores, libgomp
stops spinning between regions, and each region waits for a sleeping thread to be woken. This
times a small parallel op and a decode step's worth of per-sequence attention calls on the main
thread (whose team already exists) and then on a second thread.

    .venv/bin/python scripts/bench_omp_threads.py
"""
import threading
import time

import torch

F = torch.nn.functional
BATCH, HEADS, HEAD_DIM, CONTEXT = 32, 16, 128, 384
k_pool = torch.randn(1, BATCH * CONTEXT, HEAD_DIM).bfloat16()
v_pool = torch.randn(1, BATCH * CONTEXT, HEAD_DIM).bfloat16()
q = torch.randn(BATCH, HEADS, HEAD_DIM).bfloat16()
small = torch.randn(64 * 1024)


def attention_per_sequence():
    for i in range(BATCH):
        k = k_pool.narrow(1, i * CONTEXT, CONTEXT)
        v = v_pool.narrow(1, i * CONTEXT, CONTEXT)
        F.scaled_dot_product_attention(q[i].view(1, 1, HEADS, HEAD_DIM), k.unsqueeze(0), v.unsqueeze(0))


def timed(f, n):
    for _ in range(5):
        f()
    started = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - started) / n


def report(where):
    with torch.no_grad():
        attention = timed(attention_per_sequence, 50)
        mul = timed(lambda: small.mul(2), 2000)
    print(f"{where:>14}: {torch.get_num_threads()} threads | 32 attention calls {attention * 1e3:.2f} ms"
          f" | mul of 256 KiB {mul * 1e6:.1f} us", flush=True)


report("main thread")
second = threading.Thread(target=report, args=("second thread",))
second.start()
second.join()
