// Fills this ISA's KernelTable with its copy of every kernel of kernel_list.h.
#include "kernels/isa.h"

#define PYLLM_STR2(x) #x
#define PYLLM_STR(x) PYLLM_STR2(x)

namespace pyllm {
namespace PYLLM_ISA {

KernelTable table() {
  KernelTable t{};
  t.isa = PYLLM_STR(PYLLM_ISA);
#define PYLLM_FILL_ENTRY(name, ret, params) t.name = &name;
  PYLLM_KERNELS(PYLLM_FILL_ENTRY)
#undef PYLLM_FILL_ENTRY
  return t;
}

}  // namespace PYLLM_ISA
}  // namespace pyllm
