// Persistent worker threads for parallel_for; the calling thread works too, and runs jobs alone
// for a while when another process keeps a core busy (see Pool::run).
// Not work-stealing: items are handed out from one atomic counter, which is enough for
// kernels whose items are roughly equal or numerous.
#include "threads.h"

#include <algorithm>
#include <pthread.h>

#include <atomic>
#include <cmath>
#include <chrono>
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

// Waiting threads spin (with a pause per check, and a yield of the core every kYieldEvery
// checks) for about 0.1 ms before sleeping: back-to-back kernels (a model step) then start
// without a wake-up, which on a virtual machine can take milliseconds, while a thread that
// shares its core with a busy process still lets it run, and an idle pool gives the cores back.
constexpr int kSpinChecks = 4096;
constexpr int kYieldEvery = 256;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Spins until done() or the budget is spent; true if done.
template <class Done>
bool spin_until(Done done) {
  for (int i = 1; i <= kSpinChecks; ++i) {
    if (done()) return true;
    cpu_relax();
    if (i % kYieldEvery == 0) std::this_thread::yield();
  }
  return done();
}

// A job is published in one atomic word: its generation (high 32 bits), whether it still takes
// helpers (bit 31), and how many workers joined it (low bits). A worker joins only an open job of
// the generation it woke for; the caller closes the job once it has no more items to take, then
// waits only for the workers that joined. A worker that wakes late (its core was busy with another
// process) finds the job closed and skips it, so nobody waits for a thread that never started.
constexpr uint64_t kOpen = uint64_t(1) << 31;
constexpr uint64_t kJoinedMask = kOpen - 1;
inline uint32_t generation_of(uint64_t state) { return uint32_t(state >> 32); }

class Pool {
 public:
  // threads - 1 workers. Where the system refuses a thread (a process or memory limit) the ones
  // started are stopped; then with strict an error says so, else the pool starts again with half
  // as many as the system gave (headroom for what the threads themselves allocate).
  Pool(int threads, bool strict) {
    for (int want = threads;;) {
      int i = 1;
      try {
        for (; i < want; ++i) workers_.emplace_back([this] { worker_loop(); });
        return;
      } catch (const std::exception& e) {
        stop();
        if (strict)
          throw std::runtime_error("could not start " + std::to_string(threads) + " threads: the system refused thread " +
                                   std::to_string(i + 1) + " (" + e.what() + ")");
        want = std::max(1, i / 2);
        stopping_ = false;
      }
    }
  }
  ~Pool() { stop(); }
  int size() const { return static_cast<int>(workers_.size()) + 1; }

  void run(int64_t n, int64_t grain, RangeFn fn, void* ctx) {
    using Clock = std::chrono::steady_clock;
    const Clock::time_point start = Clock::now();
    if (start < solo_until_) {   // workers straggling lately: the caller alone, as one thread runs
      fn(ctx, 0, n);
      return;
    }
    fn_ = fn;
    ctx_ = ctx;
    n_ = n;
    grain_ = grain;
    next_.store(0, std::memory_order_relaxed);
    finished_.store(0, std::memory_order_relaxed);
    ++generation_;
    state_.store((uint64_t(generation_) << 32) | kOpen);   // seq_cst: pairs with sleepers_ below
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      start_.notify_all();
    }
    caller_items_ = work();
    const uint64_t joined = state_.fetch_and(~kOpen) & kJoinedMask;   // closed: no more helpers
    auto all_back = [&] { return uint64_t(finished_.load(std::memory_order_acquire)) == joined; };
    if (!spin_until(all_back)) {
      std::unique_lock<std::mutex> lock(mu_);
      caller_waiting_ = true;
      done_.wait(lock, all_back);
      caller_waiting_ = false;
    }
    // Another process on one of the cores: whichever of our threads shares that core runs half the
    // time, and the items split unevenly (a worker that misses jobs or stalls mid-item, or a caller
    // that falls behind its worker), while on an idle machine they split about evenly. When the
    // caller's share of the recent jobs' items is far from its even share, the next jobs run on it
    // alone for a while (the workers sleep, so it keeps a core to itself), then the workers are
    // tried again (after longer and longer spells while the machine stays busy): a busy machine
    // runs as fast as one thread does, not slower.
    const Clock::time_point end = Clock::now();
    const int64_t items = (n + grain - 1) / grain;
    if (items >= 2 * size()) {
      window_items_ += items;
      window_caller_items_ += caller_items_;
      window_time_ += end - start;
    }
    if (window_time_ >= kWindow) {
      const double share = double(window_caller_items_) / double(window_items_), even = 1.0 / size();
      if (std::abs(share - even) > 0.4 * even) {   // alone for a while, longer each time in a row
        solo_until_ = end + solo_time_;
        solo_time_ = std::min<std::chrono::steady_clock::duration>(2 * solo_time_, kLongestSolo);
      } else {
        solo_time_ = kSoloTime;
      }
      window_time_ = Clock::duration::zero();
      window_items_ = window_caller_items_ = 0;
    }
    if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  }

 private:
  // Runs items until none is left; how many this thread ran.
  int64_t work() {
    in_parallel_region = true;
    int64_t ran = 0;
    for (;; ++ran) {
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
    return ran;
  }

  // Joins the open job of generation g; false if it has closed (or another one started).
  bool join(uint32_t g) {
    uint64_t s = state_.load();
    while (generation_of(s) == g && (s & kOpen))
      if (state_.compare_exchange_weak(s, s + 1)) return true;
    return false;
  }

  void worker_loop() {
    uint32_t seen = 0;
    for (;;) {
      auto new_job = [&] { return generation_of(state_.load()) != seen; };
      if (!spin_until(new_job)) {
        std::unique_lock<std::mutex> lock(mu_);
        sleepers_.fetch_add(1);
        start_.wait(lock, new_job);
        sleepers_.fetch_sub(1);
      }
      if (stopping_) return;
      seen = generation_of(state_.load());
      if (!join(seen)) continue;
      work();
      finished_.fetch_add(1, std::memory_order_release);
      std::lock_guard<std::mutex> lock(mu_);
      if (caller_waiting_) done_.notify_one();
    }
  }

  void stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
      state_.store(uint64_t(++generation_) << 32);   // a generation no job will have
    }
    start_.notify_all();
    for (auto& w : workers_) w.join();
    workers_.clear();
  }

  static constexpr std::chrono::milliseconds kWindow{20}, kSoloTime{200}, kLongestSolo{3200};

  std::vector<std::thread> workers_;
  // The caller's (under pool_mu): the jobs' items this window and how many the caller ran.
  std::chrono::steady_clock::duration window_time_{};
  int64_t window_items_ = 0, window_caller_items_ = 0, caller_items_ = 0;
  std::chrono::steady_clock::time_point solo_until_{};
  std::chrono::steady_clock::duration solo_time_{kSoloTime};
  std::mutex mu_;
  std::condition_variable start_, done_;
  std::atomic<uint64_t> state_{0};   // generation | open | joined, see above
  uint32_t generation_ = 0;          // the caller's count of jobs (only the caller writes it)
  std::atomic<int> sleepers_{0};     // workers asleep on start_
  std::atomic<int> finished_{0};     // joined workers done with the current job
  bool caller_waiting_ = false;      // under mu_
  std::atomic<bool> stopping_{false};
  RangeFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t n_ = 0, grain_ = 1;
  std::atomic<int64_t> next_{0};
  std::exception_ptr error_;
};

// The most threads a pool takes: far more than any machine's cores, and few enough that a typo in
// PYLLM_NUM_THREADS cannot ask the system for millions.
constexpr int kMaxThreads = 1024;

// PYLLM_NUM_THREADS when it is a number in [1, kMaxThreads] (larger ones clamped), else the cores.
int default_threads() {
  if (const char* env = std::getenv("PYLLM_NUM_THREADS")) {
    char* end = nullptr;
    const long n = std::strtol(env, &end, 10);
    if (end != env && *end == '\0' && n > 0) return int(std::min<long>(n, kMaxThreads));
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
    return std::make_unique<Pool>(default_threads(), false);
  }();
  return p;
}

void reset_pool_in_child() {
  new (&pool_mu) std::mutex();  // it may have been held by another thread at the fork
  const int threads = pool()->size();
  (void)pool().release();
  pool() = std::make_unique<Pool>(threads, false);
}

}  // namespace

namespace {
// The pool's size, readable without pool_mu (kernels size their work with it, and pool_mu is held
// by whichever thread is running a job); 0 until the pool exists.
std::atomic<int> pool_threads{0};
}  // namespace

int num_threads() {
  if (const int n = pool_threads.load(std::memory_order_relaxed)) return n;
  std::lock_guard<std::mutex> lock(pool_mu);
  pool_threads.store(pool()->size(), std::memory_order_relaxed);
  return pool()->size();
}

void set_num_threads(int n) {
  check(n >= 1 && n <= kMaxThreads,
        "number of threads must be in [1, " + std::to_string(kMaxThreads) + "], got " + std::to_string(n));
  std::lock_guard<std::mutex> lock(pool_mu);
  const int old = pool()->size();
  if (old != n) {
    pool().reset();   // the old workers stopped first: the new pool may need their share of the limit
    try {
      pool() = std::make_unique<Pool>(n, true);
    } catch (...) {   // the machine keeps a pool: as many as it allows of the old size
      pool() = std::make_unique<Pool>(old, false);
      pool_threads.store(pool()->size(), std::memory_order_relaxed);
      throw;
    }
  }
  pool_threads.store(n, std::memory_order_relaxed);
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
