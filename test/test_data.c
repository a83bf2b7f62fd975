#include "test.h"

void test_data(void) {}
