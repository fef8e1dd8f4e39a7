// Empty Python module `fastlora._C`: importing it loads this shared library, whose static
// initialisers register the fastlora ops with the PyTorch dispatcher. No Python bindings are
// needed because every op is reached through torch.ops.fastlora.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "fastlora op library (registers torch.ops.fastlora)", -1,
      nullptr};
  return PyModule_Create(&module_def);
}
}
