// Work split over torch's threads so that no thread waits at the end while work is left: on a small
// machine the server's other threads (HTTP, gRPC, the relay) preempt a kernel's threads now and then,
// and with fixed shares the whole step waits for the preempted one's share while the other thread idles
// at the barrier. Which thread computes an item never changes its numbers.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

namespace baton {

// worker(next) runs once on each of torch's threads (up to n of them); next() returns the next item of
// [0, n) not yet taken, or n when none is left: a worker sets up its own scratch, then loops on next().
// Each thread takes the items of its own contiguous share in order (a stream the memory prefetcher
// follows), then the rest of the others' shares, from their front.
template <typename Worker>
static void share_items(int64_t n, Worker worker) {
  struct alignas(64) Share { std::atomic<int64_t> next; int64_t end; };   // a cache line each
  int64_t T = std::min<int64_t>(n, at::get_num_threads());
  if (T <= 0) return;
  std::unique_ptr<Share[]> shares(new Share[T]);
  for (int64_t t = 0; t < T; t++) shares[t].next = n * t / T, shares[t].end = n * (t + 1) / T;
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++) {
      int64_t from = t;
      worker([&] {
        for (; from < t + T; from++) {
          Share& s = shares[from % T];
          if (s.next.load(std::memory_order_relaxed) >= s.end) continue;
          int64_t i = s.next.fetch_add(1, std::memory_order_relaxed);
          if (i < s.end) return i;
        }
        return n;
      });
    }
  });
}

}  // namespace baton
