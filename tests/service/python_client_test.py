#!/usr/bin/python3
"""A client no one here wrote: Debian's python3-grpcio, stubs generated from our .proto by
protoc + grpc_python_plugin (or grpc_tools when present), against the asynctls-coordinator
binary serving the real SmolLM2 on the CPU. Calls Generate and grpc.health.v1.Health.

Exit 77 (CTest SKIP_RETURN_CODE) when the model or the protoc toolchain is missing.
"""
import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

SKIP = 77
HERE = os.path.dirname(os.path.abspath(__file__))


def model_path():
    p = os.environ.get("ASYNCTLS_MODEL_PATH")
    if p and os.path.exists(p):
        return p
    cache = os.environ.get("ASYNCTLS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "asynctls")
    p = os.path.join(cache, "SmolLM2-135M-Instruct.Q4_1.gguf")
    return p if os.path.exists(p) else None


def generate_stubs(out_dir, proto_dir):
    jobs = [(proto_dir, "asynctls/v1/inference.proto"), (HERE, "health.proto")]
    try:
        import grpc_tools.protoc  # noqa: F401
        base = [sys.executable, "-m", "grpc_tools.protoc"]
        plugin = []
    except ImportError:
        protoc, plugin_path = shutil.which("protoc"), shutil.which("grpc_python_plugin")
        if not protoc or not plugin_path:
            print("SKIP: neither grpc_tools nor protoc + grpc_python_plugin found")
            sys.exit(SKIP)
        base = [protoc]
        plugin = ["--plugin=protoc-gen-grpc=" + plugin_path]
    for include, proto in jobs:
        subprocess.run(base + plugin + ["-I", include, "--python_out=" + out_dir, "--grpc_out=" + out_dir,
                                        os.path.join(include, proto)], check=True)
    # asynctls/v1/ must be importable as a package.
    for d in ("asynctls", "asynctls/v1"):
        open(os.path.join(out_dir, d, "__init__.py"), "a").close()
    sys.path.insert(0, out_dir)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator", required=True, help="path of asynctls-coordinator")
    parser.add_argument("--proto-dir", required=True, help="the repository's proto/ folder")
    args = parser.parse_args()
    model = model_path()
    if not model:
        print("SKIP: SmolLM2 GGUF not found (set ASYNCTLS_MODEL_PATH)")
        return SKIP
    import grpc  # Debian's python3-grpcio

    work = tempfile.mkdtemp(prefix="asynctls-pyclient-")
    generate_stubs(work, args.proto_dir)
    import health_pb2
    import health_pb2_grpc
    from asynctls.v1 import inference_pb2, inference_pb2_grpc

    port = free_port()
    log = open(os.path.join(work, "coordinator.log"), "w+")
    server = subprocess.Popen([args.coordinator, "--model", model, "--port", str(port), "--host", "127.0.0.1",
                               "--local-engine", "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT)
    failures = []

    def check(cond, what):
        print(("ok   " if cond else "FAIL ") + what)
        if not cond:
            failures.append(what)

    try:
        channel = grpc.insecure_channel("127.0.0.1:%d" % port)
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.time() + 120
        status = None
        while time.time() < deadline and server.poll() is None:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                break
            except grpc.RpcError:
                time.sleep(0.2)
        check(status == health_pb2.HealthCheckResponse.SERVING, "health: server SERVING")
        if status is None:
            return 1
        reply = health.Check(health_pb2.HealthCheckRequest(service="asynctls.v1.Inference"), timeout=5)
        check(reply.status == health_pb2.HealthCheckResponse.SERVING, "health: asynctls.v1.Inference SERVING")

        stub = inference_pb2_grpc.InferenceStub(channel)
        request = inference_pb2.GenerateRequest(
            request_id="py-1", prompt="The capital of France is",
            sampling=inference_pb2.SamplingParams(max_tokens=8, ignore_eos=True))
        text, tokens, final = "", [], None
        for response in stub.Generate(request, timeout=120):
            kind = response.WhichOneof("response")
            if kind == "chunk":
                text += response.chunk.text
                tokens += list(response.chunk.token_ids)
            elif kind == "final":
                final = response.final
        check(final is not None, "generate: a final message")
        check(final is not None and final.finish_reason == inference_pb2.Final.FINISH_REASON_LENGTH,
              "generate: finish reason LENGTH")
        check(final is not None and final.usage.completion_tokens == 8 and len(tokens) == 8,
              "generate: 8 tokens (%d)" % len(tokens))
        check("Paris" in text, "generate: text mentions Paris (%r)" % text)

        chat = inference_pb2.GenerateRequest(
            messages=inference_pb2.ChatMessages(messages=[inference_pb2.ChatMessage(
                role="user", content="What is the capital of France?")]),
            sampling=inference_pb2.SamplingParams(max_tokens=16))
        chat_text = "".join(r.chunk.text for r in stub.Generate(chat, timeout=120) if r.HasField("chunk"))
        check("Paris" in chat_text, "generate (chat): mentions Paris (%r)" % chat_text)

        bad = inference_pb2.GenerateRequest(prompt="Hello", sampling=inference_pb2.SamplingParams(max_tokens=0))
        try:
            list(stub.Generate(bad, timeout=30))
            check(False, "max_tokens=0 is rejected")
        except grpc.RpcError as e:
            check(e.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens" in e.details(),
                  "max_tokens=0: INVALID_ARGUMENT naming the field (%s: %s)" % (e.code(), e.details()))

        models = stub.ListModels(inference_pb2.ListModelsRequest(), timeout=10)
        check(len(models.models) == 1, "ListModels: one model")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=15)
            check(code == 0, "coordinator exits cleanly on SIGTERM (exit %s)" % code)
        except subprocess.TimeoutExpired:
            server.kill()
            check(False, "coordinator exits on SIGTERM")
        if failures:
            log.seek(0)
            print("--- coordinator log ---\n" + log.read())
    shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
