#include "test.h"

void test_lora(void) {}
