#include "test.h"

void test_optim(void) {}
