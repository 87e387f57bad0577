#include "step_codec.h"

namespace asynctls {
namespace {

void ToProto(const SamplingParams& s, v1::StepSampling* out) {
  out->set_temperature(s.temperature);
  out->set_top_k(s.top_k);
  out->set_top_p(s.top_p);
  out->set_seed(s.seed);
}

SamplingParams FromProto(const v1::StepSampling& s) {
  SamplingParams out;
  out.temperature = s.temperature();
  out.top_k = s.top_k();
  out.top_p = s.top_p();
  out.seed = s.seed();
  return out;
}

}  // namespace

void ToProto(const StepPlan& plan, v1::WorkerStepPlan* out) {
  out->set_step_id(plan.step_id);
  for (uint64_t id : plan.releases) out->add_releases(id);
  for (const PrefillChunk& c : plan.prefills) {
    v1::StepPrefillChunk* p = out->add_prefills();
    p->set_seq_id(c.seq_id);
    p->mutable_tokens()->Add(c.tokens.begin(), c.tokens.end());
    p->set_start_pos(c.start_pos);
    p->set_sample(c.sample);
    ToProto(c.sampling, p->mutable_sampling());
  }
  for (const DecodeItem& d : plan.decodes) {
    v1::StepDecodeItem* p = out->add_decodes();
    p->set_seq_id(d.seq_id);
    p->set_token(d.token);
    p->set_position(d.position);
    ToProto(d.sampling, p->mutable_sampling());
    p->set_tls(d.tls);
    p->set_tls_block_budget(d.tls_block_budget);
    p->set_tls_token_budget(d.tls_token_budget);
  }
}

StepPlan FromProto(const v1::WorkerStepPlan& plan) {
  StepPlan out;
  out.step_id = plan.step_id();
  out.releases.assign(plan.releases().begin(), plan.releases().end());
  for (const auto& p : plan.prefills()) {
    PrefillChunk c;
    c.seq_id = p.seq_id();
    c.tokens.assign(p.tokens().begin(), p.tokens().end());
    c.start_pos = p.start_pos();
    c.sample = p.sample();
    c.sampling = FromProto(p.sampling());
    out.prefills.push_back(std::move(c));
  }
  for (const auto& p : plan.decodes()) {
    DecodeItem d;
    d.seq_id = p.seq_id();
    d.token = p.token();
    d.position = p.position();
    d.sampling = FromProto(p.sampling());
    d.tls = p.tls();
    d.tls_block_budget = p.tls_block_budget();
    d.tls_token_budget = p.tls_token_budget();
    out.decodes.push_back(d);
  }
  return out;
}

void ToProto(const StepResult& result, v1::WorkerStepResult* out) {
  out->set_step_id(result.step_id);
  for (const SampledToken& t : result.tokens) {
    v1::StepSampledToken* p = out->add_tokens();
    p->set_seq_id(t.seq_id);
    p->set_token(t.token);
    p->set_logprob(t.logprob);
  }
  for (const SequenceError& e : result.errors) {
    v1::StepSequenceError* p = out->add_errors();
    p->set_seq_id(e.seq_id);
    p->set_message(e.message);
  }
  out->set_step_ms(result.step_ms);
  out->set_kv_blocks_used(result.kv_blocks_used);
  out->set_kv_blocks_total(result.kv_blocks_total);
}

StepResult FromProto(const v1::WorkerStepResult& result) {
  StepResult out;
  out.step_id = result.step_id();
  for (const auto& t : result.tokens()) out.tokens.push_back({t.seq_id(), t.token(), t.logprob()});
  for (const auto& e : result.errors()) out.errors.push_back({e.seq_id(), e.message()});
  out.step_ms = result.step_ms();
  out.kv_blocks_used = result.kv_blocks_used();
  out.kv_blocks_total = result.kv_blocks_total();
  return out;
}

void ToProto(const ExecutorInfo& info, v1::WorkerHello* out) {
  out->set_device(info.device);
  out->set_model(info.model_name);
  out->set_kv_blocks_total(info.kv_blocks_total);
  out->set_max_context(info.max_context);
  out->set_vocab_size(info.vocab_size);
  out->set_max_batch_tokens(info.max_batch_tokens);
  out->set_tls(info.tls);
  out->set_tls_block_budget(info.tls_block_budget);
  out->set_tls_token_budget(info.tls_token_budget);
}

ExecutorInfo InfoFromHello(const v1::WorkerHello& hello) {
  ExecutorInfo info;
  info.model_name = hello.model();
  info.device = hello.device();
  info.vocab_size = hello.vocab_size();
  info.max_context = hello.max_context();
  info.kv_blocks_total = hello.kv_blocks_total();
  info.max_batch_tokens = hello.max_batch_tokens();
  info.tls = hello.tls();
  info.tls_block_budget = hello.tls_block_budget();
  info.tls_token_budget = hello.tls_token_budget();
  return info;
}

}  // namespace asynctls
