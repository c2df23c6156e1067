"""`qlora-serve` command line: serve, generate, adapters, jobs, train, merge, keys."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from qlora_serve import __version__
from qlora_serve.server.cli_checks import CliError, check_utf8, local_adapter_dir, terminal_text
from qlora_serve.server.client import DEFAULT_ADDRESS

log = logging.getLogger("qlora_serve")


# ----------------------------------------------------------------- serve
# Help texts that say more than the config field's own (which the engine owns).
_FLAG_HELP = {
    "host_cache_bytes": "bound on the total size, in bytes, of parsed adapter weights kept in host RAM (LRU) "
                        "after a disk read or an eviction from a device slot, so a re-load skips disk and "
                        "parsing; a larger adapter is not cached; 0 = no host cache",
}


def _label_flag(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--label needs KEY=VALUE, got {value!r}")
    return key, val


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to help that does not already say what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "default" in text else super()._get_help_string(action)


def _add_serve(sub) -> None:
    from qlora_serve.options import add_flags
    from qlora_serve.server.config import EngineConfig, RequestLimits, ServerConfig

    p = sub.add_parser("serve", help="start the gRPC server (no flags: the embedded tiny demo model)",
                       formatter_class=_DefaultsHelp)
    add_flags(p, ServerConfig)
    p.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="json: one JSON object per log line (request lines carry request_id, tenant, adapter, "
                        "code, tokens, latency_ms as fields)")
    add_flags(p.add_argument_group("engine"), EngineConfig, help_overrides=_FLAG_HELP)
    add_flags(p.add_argument_group("request limits"), RequestLimits)
    p.set_defaults(func=_serve)


def _serve(args) -> int:
    from qlora_serve.errors import QloraServeError
    from qlora_serve.options import values_from
    from qlora_serve.server.app import QloraServer
    from qlora_serve.server.config import EngineConfig, RequestLimits, ServerConfig

    try:
        config = ServerConfig(**values_from(args, ServerConfig), engine=EngineConfig(**values_from(args, EngineConfig)),
                              limits=RequestLimits(**values_from(args, RequestLimits)))
        server = QloraServer(config).start()
    except (ValueError, OSError, QloraServeError) as exc:
        print(f"qlora-serve: error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server.load()
    except QloraServeError as exc:
        print(f"qlora-serve: error: {exc}", file=sys.stderr)
        server.stop(0)
        return 2
    address = f"{'localhost' if args.host in ('127.0.0.1', '0.0.0.0', '::') else args.host}:{server.port}"
    try:
        adapters = sorted({r.name for r in server.runtime.registry.list()})
    except QloraServeError:  # a --registry-address server not reachable yet: the engine serves the base
        adapters = []
    print(f"qlora-serve {__version__} ready on {address}  (adapters: {', '.join(adapters) or 'none'})", flush=True)
    if config.role == "registry":
        where = "" if address == DEFAULT_ADDRESS else f" --address {address}"
        print(f"registry only (no engine): engine servers follow it with --registry-address HOST:{server.port}; "
              f"try:  qlora-serve adapters list{where}", flush=True)
    else:
        print(f"try:  {try_command(address, adapters)}", flush=True)
    if server.http_port is not None:
        host = address.rsplit(":", 1)[0]
        print(f"      curl http://{host}:{server.http_port}/v1/models   (OpenAI-compatible HTTP API)", flush=True)
    stop.wait()
    log.info("shutting down: finishing in-flight requests (up to %.0f s)", config.grace_s)
    server.stop()
    return 0


def try_command(address: str, adapters: list[str]) -> str:
    """The command the start-up message offers; `--address` only where the client's
    default would not reach this server (the README shows it for the default)."""
    where = "" if address == DEFAULT_ADDRESS else f" --address {address}"
    example = f" --adapter {adapters[0]}" if adapters else ""
    return f'qlora-serve generate{where}{example} "hello"'


# --------------------------------------------------------------- clients
def _client(args):
    from qlora_serve.server.client import Client

    return Client(args.address, api_key=args.api_key, timeout=args.timeout)


def _add_client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, help=f"server address (default: $QLORA_SERVE_ADDRESS or {DEFAULT_ADDRESS})")
    p.add_argument("--api-key", default=None, help="API key (default: $QLORA_SERVE_API_KEY)")
    p.add_argument("--timeout", type=float, default=None, help="deadline per call, seconds")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a running server")
    p.add_argument("prompt")
    p.add_argument("--adapter", default="", help="adapter ref: name, name@VERSION or name@ALIAS (default: base)")
    p.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--json", action="store_true", help="print the whole response as JSON")
    g = p.add_argument_group("more sampling controls (ranges: README, Request fields)")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="[-2, 2], 0 = off")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="[-2, 2], 0 = off")
    g.add_argument("--repetition-penalty", type=float, default=None, help="> 0, 1 = off")
    g.add_argument("--min-p", type=float, default=0.0, help="[0, 1], 0 = off")
    g.add_argument("--stop-token-id", type=int, action="append", default=[], help="stop token id (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating after the eos token")
    g.add_argument("--min-tokens", type=int, default=0, help="no eos / stop token before this many tokens")
    g.add_argument("--logprobs", action="store_true", help="print each token's log-probability")
    g.add_argument("--top-logprobs", type=int, default=0, help="and this many alternatives (0..20; implies --logprobs)")
    g.add_argument("--chat", action="store_true", help="send PROMPT as a user chat message (chat template)")
    g.add_argument("--system", default=None, help="a system message before it (implies --chat)")
    _add_client_flags(p)
    p.set_defaults(func=_generate)
    p = sub.add_parser("model-info", help="the served base: name, context length, vocabulary, dtype, memory")
    p.add_argument("--json", action="store_true", help="print as JSON")
    _add_client_flags(p)
    p.set_defaults(func=_model_info)


def _generate(args) -> int:
    from google.protobuf.json_format import MessageToDict

    kw = dict(adapter=args.adapter, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
              top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop,
              presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
              repetition_penalty=args.repetition_penalty, min_p=args.min_p, stop_token_ids=args.stop_token_id,
              ignore_eos=args.ignore_eos, min_tokens=args.min_tokens,
              logprobs=args.logprobs or args.top_logprobs > 0, top_logprobs=args.top_logprobs)
    prompt = args.prompt
    if args.chat or args.system is not None:
        kw["messages"] = ([("system", args.system)] if args.system is not None else []) + [("user", prompt)]
        prompt = ""
    logprobs = []
    with _client(args) as client:
        if args.stream:
            for chunk in client.stream(prompt, **kw):
                print(json.dumps(MessageToDict(chunk)) if args.json else terminal_text(chunk.text),
                      end="\n" if args.json else "", flush=True)
                logprobs += chunk.logprobs
            if not args.json:
                print()
        else:
            resp = client.generate(prompt, **kw)
            print(json.dumps(MessageToDict(resp), indent=2) if args.json else terminal_text(resp.text))
            logprobs = resp.logprobs
    if not args.json:
        for lp in logprobs:  # token text as JSON strings: no raw control characters reach the terminal
            alts = "  ".join(f"{json.dumps(t.token)}={t.logprob:.4f}" for t in lp.top_logprobs)
            print(f"{lp.logprob:9.4f}  {lp.token_id:>6}  {json.dumps(lp.token)}" + (f"  | {alts}" if alts else ""))
    return 0


def _model_info(args) -> int:
    from google.protobuf.json_format import MessageToDict

    with _client(args) as client:
        info = MessageToDict(client.model_info(), preserving_proto_field_name=True,
                             always_print_fields_with_no_presence=True)
    print(json.dumps(info, indent=2) if args.json else "\n".join(f"{k}: {v}" for k, v in info.items()))
    return 0


def _add_adapters(sub) -> None:
    p = sub.add_parser("adapters", help="manage the adapter registry of a running server")
    verbs = p.add_subparsers(dest="verb", required=True)
    v = verbs.add_parser("list", help="list adapters you can use")
    v.add_argument("--name", default="")
    v = verbs.add_parser("show", help="one adapter version in detail")
    v.add_argument("ref", help="name, name@VERSION or name@ALIAS")
    v = verbs.add_parser("register", help="register a new version (uploads a local directory by default)")
    v.add_argument("name")
    v.add_argument("path", help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    v.add_argument("--server-path", action="store_true",
                   help="PATH is on the server, inside an --allowed-adapter-root; nothing is uploaded")
    v.add_argument("--owner", default="")
    v.add_argument("--label", type=_label_flag, action="append", default=[], metavar="KEY=VALUE",
                   help="a label for the new version (repeatable)")
    v.add_argument("--set-default", action="store_true", help="point the 'default' alias at the new version")
    v.add_argument("--public", action="store_true", help="usable by every tenant (admin keys only)")
    v = verbs.add_parser("alias", help="point NAME@ALIAS at a version ('default' decides what plain NAME serves)")
    v.add_argument("name")
    v.add_argument("alias")
    v.add_argument("version", type=int)
    v = verbs.add_parser("delete", help="delete a version, or every version of a name")
    v.add_argument("name")
    v.add_argument("--version", type=int, default=0, help="0 = all versions")
    for verb, text in (("load", "make resident on the device now"), ("unload", "free its device slot")):
        v = verbs.add_parser(verb, help=text)
        v.add_argument("ref")
    for v in verbs.choices.values():
        _add_client_flags(v)
        v.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_adapters)


def _adapters(args) -> int:
    from google.protobuf.json_format import MessageToDict

    with _client(args) as c:
        if args.verb == "list":
            infos = c.list_adapters(args.name)
        elif args.verb == "show":
            infos = [c.get_adapter(args.ref)]
        elif args.verb == "register":
            labels = dict(args.label)
            if args.server_path:  # the server refuses relative paths; resolve against our working dir
                fn, path = c.register_path, os.path.abspath(args.path)
            else:
                fn, path = c.upload, local_adapter_dir(args.path)
            infos = [fn(args.name, path, owner=args.owner, labels=labels, set_default=args.set_default,
                        public=args.public)]
        elif args.verb == "alias":
            infos = [c.set_alias(args.name, args.alias, args.version)]
        elif args.verb == "delete":
            infos = c.delete(args.name, args.version)
        else:
            infos = [getattr(c, args.verb)(args.ref)]
    if args.json or args.verb == "show":
        print(json.dumps([MessageToDict(i, always_print_fields_with_no_presence=True) for i in infos], indent=2))
        return 0
    from qlora_serve.v1 import registry_pb2

    print(f"{'ADAPTER':<28} {'RANK':>4} {'ALIASES':<16} {'RESIDENCY':<9} {'OWNER':<12} DIGEST")
    for i in infos:
        residency = registry_pb2.Residency.Name(i.residency).removeprefix("RESIDENCY_").lower()
        print(f"{i.name + '@' + str(i.version):<28} {i.rank:>4} {','.join(i.aliases) or '-':<16} "
              f"{residency:<9} {i.owner or 'public':<12} {i.digest[:12]}")
    return 0


def _add_health(sub) -> None:
    p = sub.add_parser("health", help="exit 0 when the server reports SERVING (for container health checks)")
    _add_client_flags(p)
    p.set_defaults(func=_health)


def _health(args) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with _client(args) as c:
        resp = health_pb2_grpc.HealthStub(c.channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                            timeout=args.timeout or 5)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(status)
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1


# ------------------------------------------------------------------ jobs
def _add_jobs(sub) -> None:
    p = sub.add_parser("jobs", help="QLoRA training jobs on a running server (the Training service)",
                       description="Submit, list, watch and cancel training jobs on the server's base. A job runs "
                       "in its own server-side process; when it succeeds its adapter is registered and served at "
                       "once. Config keys are the `qlora-serve train` flags (training/README.md).")
    verbs = p.add_subparsers(dest="verb", required=True)
    v = verbs.add_parser("submit", help="upload a JSONL dataset and queue a job")
    v.add_argument("--name", required=True, help="adapter name the result is registered under (a new version)")
    v.add_argument("--data", required=True, type=Path, metavar="FILE.jsonl", help="training data (uploaded)")
    v.add_argument("--eval-data", type=Path, default=None, metavar="FILE.jsonl", help="validation data (uploaded)")
    v.add_argument("--config", type=Path, default=None, metavar="FILE.toml",
                   help="hyperparameters, keys as the `qlora-serve train` flags (base/data/eval_data/out/name/register/"
                        "resume/progress_bar are set by the server and refused; so is modules_to_save)")
    v.add_argument("--set-default", action="store_true", help="point the adapter's 'default' alias at the result")
    v.add_argument("--watch", action="store_true", help="stream progress until the job ends; exit 0 only if it succeeded")
    verbs.add_parser("list", help="jobs you can see, oldest first")
    v = verbs.add_parser("watch", help="stream a job's events (all so far, then new ones) until it ends")
    v.add_argument("id")
    v = verbs.add_parser("cancel", help="stop a job (a queued one never starts; a running one stops after its step)")
    v.add_argument("id")
    v = verbs.add_parser("curve", help="save a job's loss curve (PNG: train/eval loss, learning rate; drawn so far "
                         "while it runs)")
    v.add_argument("id")
    v.add_argument("--out", required=True, type=Path, metavar="FILE.png", help="where to write the PNG")
    for v in verbs.choices.values():
        _add_client_flags(v)
        v.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_jobs)


def _job_state(job) -> str:
    from qlora_serve.v1 import training_pb2

    return training_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_")


def _print_jobs(jobs) -> None:
    print(f"{'ID':<13} {'ADAPTER':<24} {'STATE':<10} {'STEP':>11} {'LOSS':>8}  RESULT")
    for j in jobs:
        steps = f"{j.step}/{j.max_steps}" if j.max_steps else str(j.step)
        result = j.error if j.error else (f"{j.adapter.name}@{j.adapter.version}" if j.adapter.name else "-")
        print(f"{j.id:<13} {j.adapter_name:<24} {_job_state(j):<10} {steps:>11} {j.loss:>8.4f}  {result}")


def _event_line(ev) -> str:
    """One human line per TrainingEvent."""
    d, j = json.loads(ev.details_json or "{}"), ev.job
    head = f"[{j.id}]"
    if ev.event == "log":
        line = f"{head} step {d.get('step', j.step)}/{d.get('max_steps', j.max_steps)}  loss {d.get('loss', 0):.4f}"
        if d.get("learning_rate") is not None:
            line += f"  lr {d['learning_rate']:.3e}"
        if d.get("tokens_per_s") is not None:
            line += f"  tok/s {d['tokens_per_s']:.0f}"
        if d.get("peak_memory_mb") is not None:
            line += f"  peak mem {d['peak_memory_mb']:.0f} MiB"
        return line
    if ev.event == "eval":
        return f"{head} step {d.get('step', j.step)}  eval loss {d.get('eval_loss', 0):.4f}  ppl {d.get('eval_perplexity', 0):.3f}"
    if ev.event == "start":
        return (f"{head} started: {d.get('train_examples')} examples, trainable params {d.get('trainable_params', 0):,} "
                f"of {d.get('total_params', 0):,}, packing {'on' if d.get('packing') else 'off'}")
    if ev.event == "registered":
        return (f"{head} SUCCEEDED at step {j.step}: adapter {j.adapter.name}@{j.adapter.version} registered "
                f"(digest {j.adapter.digest[:12]}), final loss {j.loss:.4f}")
    if ev.event == "error":
        return f"{head} FAILED: {j.error}"
    if ev.event == "cancelled":
        return f"{head} CANCELLED at step {j.step}"
    if ev.event == "resumed":  # a server restart interrupted it (README "Jobs survive a restart")
        return f"{head} resumed from step {d.get('from_step')} (interrupted at step {d.get('interrupted_at_step')})"
    return f"{head} {ev.event} ({_job_state(j).lower()})"


def _watch(client, job_id: str, as_json: bool) -> int:
    from google.protobuf.json_format import MessageToDict

    from qlora_serve.v1 import training_pb2

    last = None
    for ev in client.watch_job(job_id):
        last = ev.job
        if as_json:
            print(json.dumps({**MessageToDict(ev), "details": json.loads(ev.details_json or "{}")}), flush=True)
        else:
            print(_event_line(ev), flush=True)
    return 0 if last is not None and last.state == training_pb2.JOB_STATE_SUCCEEDED else 1


def _jobs(args) -> int:
    from google.protobuf.json_format import MessageToDict

    def show(jobs) -> None:
        if args.json:
            print(json.dumps([MessageToDict(j, always_print_fields_with_no_presence=True) for j in jobs], indent=2))
        else:
            _print_jobs(jobs)

    with _client(args) as c:
        if args.verb == "submit":
            for path in (args.data, args.eval_data, args.config):
                if path is not None and not path.is_file():
                    print(f"qlora-serve jobs submit: error: {path} does not exist", file=sys.stderr)
                    return 2
            job = c.submit_job(args.name, args.data, eval_jsonl=args.eval_data, config_toml=args.config or "",
                               set_default=args.set_default)
            if not args.watch:
                show([job])
                return 0
            if not args.json:
                print(f"submitted job {job.id} (adapter {job.adapter_name})", flush=True)
            return _watch(c, job.id, args.json)
        if args.verb == "watch":
            return _watch(c, args.id, args.json)
        if args.verb == "curve":
            art = c.loss_curve(args.id)
            args.out.write_bytes(art.data)
            print(json.dumps({"id": art.id, "step": art.step, "path": str(args.out)}) if args.json
                  else f"loss curve of job {art.id} (step {art.step}) written to {args.out}")
            return 0
        show(c.list_jobs() if args.verb == "list" else [c.cancel_job(args.id)])
    return 0


# ------------------------------------------------------------------ main
class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, message, the record's
    `extra` fields (e.g. the request log's request_id, tenant, code), and exc."""

    _STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        out.update((k, v) for k, v in vars(record).items() if k not in self._STANDARD and not k.startswith("_"))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str, fmt: str = "text") -> None:
    """Root logging for the CLI: `text` (human) or `json` (one object per line)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json"
                         else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def build_parser() -> argparse.ArgumentParser:
    from qlora_serve.server.auth import add_keys_parser
    from qlora_serve.training.cli import add_merge_parser, add_train_parser

    parser = argparse.ArgumentParser(prog="qlora-serve", description="Multi-adapter LLM server: one NF4 "
                                     "double-quantized base, LoRA adapters per request, over gRPC.")
    parser.add_argument("--version", action="version", version=f"qlora-serve {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_generate(sub)
    _add_adapters(sub)
    _add_health(sub)
    _add_jobs(sub)
    from qlora_serve.server.ray_cli import add_ray_serve_parser  # imports ray only when run

    add_ray_serve_parser(sub)
    add_train_parser(sub)
    add_merge_parser(sub)
    add_keys_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    import grpc

    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, getattr(args, "log_format", "text"))
    try:
        if hasattr(args, "address"):  # a client verb: what it sends must be UTF-8
            check_utf8(args)
        return int(args.func(args) or 0)
    except grpc.RpcError as exc:  # a client verb's server answered with an error status
        print(f"qlora-serve: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except CliError as exc:
        print(f"qlora-serve: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`... | head -1`): stop quietly, as cat does. Point stdout
        # at /dev/null so the interpreter's final flush does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a writer killed by the broken pipe
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
