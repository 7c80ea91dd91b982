// Picks, once at import, the best compiled copy of the kernels that this CPU can run.
// Not compiled with any -m flag: this file must run on every CPU of the architecture.
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common.h"
#include "kernels/kernels.h"

namespace pyllm {
namespace {

struct Choice {
  const char* name;
  KernelTable (*make)();
  bool supported;
};

std::vector<Choice>& choices() {
  static std::vector<Choice> list = [] {
    std::vector<Choice> c;
    c.push_back({"generic", &generic::table, true});
#if PYLLM_HAVE_X86
    __builtin_cpu_init();
    bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                  __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512vnni");
    c.push_back({"avx2", &avx2::table, avx2});
    c.push_back({"avx512", &avx512::table, avx512});
#endif
    return c;
  }();
  return list;
}

KernelTable& active() {
  static KernelTable table = [] {
    const Choice* best = nullptr;
    for (const auto& c : choices())
      if (c.supported) best = &c;
    KernelTable t = best->make();
    // PYLLM_ISA=<name> in the environment forces a lower level (testing, comparisons).
    if (const char* forced = std::getenv("PYLLM_ISA"))
      for (const auto& c : choices())
        if (c.supported && std::strcmp(c.name, forced) == 0) t = c.make();
    return t;
  }();
  return table;
}

}  // namespace

const KernelTable& kernels() { return active(); }

const char* const* available_isas(int* count) {
  static std::vector<const char*> names = [] {
    std::vector<const char*> n;
    for (const auto& c : choices())
      if (c.supported) n.push_back(c.name);
    return n;
  }();
  *count = static_cast<int>(names.size());
  return names.data();
}

void select_isa(const char* name) {
  for (const auto& c : choices()) {
    if (std::strcmp(c.name, name) != 0) continue;
    check(c.supported, std::string("this CPU cannot run the '") + name + "' kernels");
    active() = c.make();
    return;
  }
  check(false, std::string("unknown ISA '") + name + "'");
}

const char* const* kernel_names(int* count) {
  static const char* const names[] = {
#define PYLLM_KERNEL_NAME(name, ret, params) #name,
      PYLLM_KERNELS(PYLLM_KERNEL_NAME)
#undef PYLLM_KERNEL_NAME
  };
  *count = static_cast<int>(sizeof(names) / sizeof(names[0]));
  return names;
}

}  // namespace pyllm
