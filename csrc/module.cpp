// The Python module minimind_fast._C. Importing it loads this shared library, whose static
// initialisers run TORCH_LIBRARY(minimind_fast, ...) and the CPU/CUDA kernel registrations;
// the ops are then reached as torch.ops.minimind_fast.* (wrapped by minimind_fast/ops/).
// Only setup.py builds this file; CMake builds the same ops into a plain shared library.
#include <Python.h>

static struct PyModuleDef minimind_fast_c_module = {
    PyModuleDef_HEAD_INIT, "_C", "minimind_fast C++/CUDA ops (registered with torch.library)", -1, nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&minimind_fast_c_module); }
