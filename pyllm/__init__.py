"""pyllm: a readable large-language-model stack with C++ kernels and numpy at the boundary.

Not a PyTorch wrapper: nothing here imports torch at run time.
"""

from pyllm import kernels, reference
from pyllm.kernels import get_num_threads, set_num_threads

__version__ = "0.1.0"
__all__ = ["kernels", "reference", "get_num_threads", "set_num_threads", "__version__"]
