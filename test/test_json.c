#include "test.h"

void test_json(void) {}
