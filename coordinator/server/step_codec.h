// StepPlan / StepResult / ExecutorInfo <-> their asynctls.v1 worker.proto messages. Shared by
// the coordinator's WorkerRegistry and the asynctls-worker binary; plain copies, no checks
// beyond what the types guarantee (the engine validates plans).
#pragma once

#include "asynctls/runtime/step_plan.h"
#include "asynctls/v1/worker.pb.h"

namespace asynctls {

void ToProto(const StepPlan& plan, v1::WorkerStepPlan* out);
StepPlan FromProto(const v1::WorkerStepPlan& plan);

void ToProto(const StepResult& result, v1::WorkerStepResult* out);
StepResult FromProto(const v1::WorkerStepResult& result);

// The worker's Hello <-> the ExecutorInfo the coordinator's scheduler sees.
void ToProto(const ExecutorInfo& info, v1::WorkerHello* out);
ExecutorInfo InfoFromHello(const v1::WorkerHello& hello);

}  // namespace asynctls
