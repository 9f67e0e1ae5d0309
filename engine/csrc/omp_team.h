// LibTorch's OpenMP team, for onehead's own kernels (amx.cpp, int8.cpp): GOMP_parallel and the
// team's size and thread numbers, looked up at run time, so that the kernels add no threads of
// their own; where they are missing, a kernel runs on the calling thread.
#pragma once

#include <dlfcn.h>

#include <cstdint>

namespace onehead {

using GompParallel = void (*)(void (*)(void *), void *, unsigned, unsigned);
using OmpInt = int (*)();

struct Omp {
  GompParallel parallel = nullptr;
  OmpInt thread_num = nullptr;
  OmpInt num_threads = nullptr;
};

inline const Omp &omp() {
  static const Omp found = [] {
    Omp o;
    o.parallel = reinterpret_cast<GompParallel>(dlsym(RTLD_DEFAULT, "GOMP_parallel"));
    o.thread_num = reinterpret_cast<OmpInt>(dlsym(RTLD_DEFAULT, "omp_get_thread_num"));
    o.num_threads = reinterpret_cast<OmpInt>(dlsym(RTLD_DEFAULT, "omp_get_num_threads"));
    if (!o.parallel || !o.thread_num || !o.num_threads) o = Omp{};
    return o;
  }();
  return found;
}

// The calling thread's team: its size, and this thread's number in it.
struct Team {
  int64_t threads, me;
};

inline Team team() {
  const Omp &o = omp();
  return o.parallel ? Team{o.num_threads(), o.thread_num()} : Team{1, 0};
}

// Runs `share(job)` on LibTorch's OpenMP team where it was found and `shared`, else on the
// calling thread alone.
inline void on_team(void (*share)(void *), void *job, bool shared = true) {
  const Omp &o = omp();
  if (o.parallel && shared) {
    o.parallel(share, job, 0, 0);
  } else {
    share(job);
  }
}

}  // namespace onehead
