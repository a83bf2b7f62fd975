#include "test.h"

void test_files(void) {}
