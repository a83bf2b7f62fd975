#include "test.h"

void test_quant(void) {}
