/* The steady state of a server's get_batch and respond, in C (see stepmesh.server). */
#include "_ucpc.h"

int smc_add_server_types(PyObject *m) { return 0; }
