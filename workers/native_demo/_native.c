#define PY_SSIZE_T_CLEAN
#include <Python.h>
static PyMethodDef M[] = {{NULL,NULL,0,NULL}};
static struct PyModuleDef D = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, M};
PyMODINIT_FUNC PyInit__native(void){return PyModule_Create(&D);}
