#include "asynctls/runtime/logging.h"
