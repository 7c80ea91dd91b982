// Persistent worker threads for parallel_for; the calling thread works too.
// Not work-stealing: items are handed out from one atomic counter, which is enough for
// kernels whose items are roughly equal or numerous.
#include "threads.h"

#include <algorithm>
#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <thread>
#include <utility>
#include <vector>

#include "common.h"

namespace pyllm {
namespace {

thread_local bool in_parallel_region = false;

// Waiting threads spin this many pauses (about 0.1 ms) before sleeping: back-to-back kernels
// (a model step) then start without a wake-up, which on a virtual machine can take milliseconds,
// and an idle pool still gives the cores back quickly.
constexpr int kSpinPauses = 4096;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

class Pool {
 public:
  explicit Pool(int threads) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { worker_loop(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
      generation_.fetch_add(1);
    }
    start_.notify_all();
    for (auto& w : workers_) w.join();
  }
  int size() const { return static_cast<int>(workers_.size()) + 1; }

  void run(int64_t n, int64_t grain, RangeFn fn, void* ctx) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = fn;
      ctx_ = ctx;
      n_ = n;
      grain_ = grain;
      next_.store(0);
      active_.store(static_cast<int>(workers_.size()));
      generation_.fetch_add(1);
    }
    start_.notify_all();
    work();
    for (int i = 0; i < kSpinPauses && active_.load() != 0; ++i) cpu_relax();
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [this] { return active_.load() == 0; });
    if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  }

 private:
  void work() {
    in_parallel_region = true;
    for (;;) {
      int64_t begin = next_.fetch_add(grain_);
      if (begin >= n_) break;
      try {
        fn_(ctx_, begin, std::min(n_, begin + grain_));
      } catch (...) {  // keep the first error for the caller; the other items still run
        std::lock_guard<std::mutex> lock(mu_);
        if (!error_) error_ = std::current_exception();
      }
    }
    in_parallel_region = false;
  }

  void worker_loop() {
    uint64_t seen = 0;
    for (;;) {
      for (int i = 0; i < kSpinPauses && generation_.load() == seen; ++i) cpu_relax();
      {
        std::unique_lock<std::mutex> lock(mu_);
        start_.wait(lock, [&] { return generation_.load() != seen; });
        seen = generation_.load();
        if (stopping_) return;
      }
      work();
      std::lock_guard<std::mutex> lock(mu_);
      if (active_.fetch_sub(1) == 1) done_.notify_one();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable start_, done_;
  std::atomic<uint64_t> generation_{0};  // bumped (under mu_) for every job
  bool stopping_ = false;
  std::atomic<int> active_{0};           // workers still inside the current job
  RangeFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t n_ = 0, grain_ = 1;
  std::atomic<int64_t> next_{0};
  std::exception_ptr error_;
};

int default_threads() {
  if (const char* env = std::getenv("PYLLM_NUM_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

std::mutex pool_mu;  // one job at a time; a second caller runs its job inline

// A forked child (multiprocessing, data loaders) inherits the pool but not its threads: it
// gets a fresh pool of its own. The parent's Pool object is abandoned, not destroyed, since its
// destructor would join threads that do not exist in the child.
void reset_pool_in_child();

std::unique_ptr<Pool>& pool() {
  static std::unique_ptr<Pool> p = [] {
    pthread_atfork(nullptr, nullptr, &reset_pool_in_child);
    return std::make_unique<Pool>(default_threads());
  }();
  return p;
}

void reset_pool_in_child() {
  new (&pool_mu) std::mutex();  // it may have been held by another thread at the fork
  const int threads = pool()->size();
  (void)pool().release();
  pool() = std::make_unique<Pool>(threads);
}

}  // namespace

int num_threads() {
  std::lock_guard<std::mutex> lock(pool_mu);
  return pool()->size();
}

void set_num_threads(int n) {
  check(n >= 1, "number of threads must be at least 1, got " + std::to_string(n));
  std::lock_guard<std::mutex> lock(pool_mu);
  if (pool()->size() != n) {
    pool().reset();
    pool() = std::make_unique<Pool>(n);
  }
}

void parallel_run(int64_t n, int64_t grain, RangeFn fn, void* ctx) {
  if (n <= grain || in_parallel_region) {
    fn(ctx, 0, n);
    return;
  }
  std::unique_lock<std::mutex> lock(pool_mu, std::try_to_lock);
  if (!lock.owns_lock() || pool()->size() == 1) {
    fn(ctx, 0, n);
    return;
  }
  pool()->run(n, grain, fn, ctx);
}

}  // namespace pyllm
