"""A small Python client for a running qlora-serve server.

    from qlora_serve.server.client import Client
    with Client("localhost:50051") as c:
        print(c.generate("hello", adapter="pirate", max_new_tokens=16).text)
        for chunk in c.stream("hello"):
            print(chunk.text, end="", flush=True)
        r = c.chat([("user", "hello")], adapter="poet", logprobs=True, top_logprobs=3)
        print(c.model_info().context_length)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import grpc

from qlora_serve.adapters.layout import ADAPTER_FILES, CONFIG_FILE, PICKLE_WEIGHTS, WEIGHTS_FILE
from qlora_serve.v1 import inference_pb2, inference_pb2_grpc, registry_pb2, registry_pb2_grpc, training_pb2, training_pb2_grpc

DEFAULT_PORT = 50051  # the port `qlora-serve serve` binds by default (ServerConfig.port)
DEFAULT_ADDRESS = f"localhost:{DEFAULT_PORT}"
_UPLOAD_CHUNK = 1 << 20  # bytes per streamed chunk, well under gRPC's 4 MiB default message limit



_MAX_ROUTED_REF = 160  # characters: the longest adapter reference sent as a routing header


class Client:
    """Inference, registry and training calls. `api_key` (or $QLORA_SERVE_API_KEY) is sent as a
    bearer token; `timeout` (seconds) becomes each call's gRPC deadline."""

    def __init__(self, address: str | None = None, *, api_key: str | None = None, timeout: float | None = None):
        self.address = address or os.environ.get("QLORA_SERVE_ADDRESS", DEFAULT_ADDRESS)
        key = api_key if api_key is not None else os.environ.get("QLORA_SERVE_API_KEY")
        self._metadata = (("authorization", f"Bearer {key}"),) if key else ()
        self.timeout = timeout
        self.channel = grpc.insecure_channel(self.address)
        self.inference = inference_pb2_grpc.InferenceStub(self.channel)
        self.registry = registry_pb2_grpc.AdapterRegistryStub(self.channel)
        self.training = training_pb2_grpc.TrainingStub(self.channel)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _kw(self) -> dict:
        return {"metadata": self._metadata, "timeout": self.timeout}

    @staticmethod
    def request(prompt: str = "", *, adapter: str = "", prompt_token_ids=None, messages=None,
                max_new_tokens: int | None = None, temperature: float = 0.0, top_p: float | None = None,
                top_k: int = 0, seed: int | None = None, stop=(), request_id: str = "",
                presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                repetition_penalty: float | None = None, min_p: float = 0.0, stop_token_ids=(),
                ignore_eos: bool = False, min_tokens: int = 0, logprobs: bool = False,
                top_logprobs: int = 0) -> inference_pb2.GenerateRequest:
        """Build a GenerateRequest; None leaves optional fields unset (server defaults).
        `messages`: [(role, content)] or [{"role": ..., "content": ...}] (chat, instead of prompt)."""
        chat = [inference_pb2.ChatMessage(role=m[0], content=m[1]) if isinstance(m, (tuple, list))
                else inference_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages or ()]
        msg = inference_pb2.GenerateRequest(adapter=adapter, prompt=prompt, prompt_token_ids=prompt_token_ids or [],
                                            messages=chat, temperature=temperature, top_k=top_k, stop=list(stop),
                                            request_id=request_id, presence_penalty=presence_penalty,
                                            frequency_penalty=frequency_penalty, min_p=min_p,
                                            stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos,
                                            min_tokens=min_tokens, logprobs=logprobs, top_logprobs=top_logprobs)
        if max_new_tokens is not None:
            msg.max_new_tokens = max_new_tokens
        if top_p is not None:
            msg.top_p = top_p
        if seed is not None:
            msg.seed = seed
        if repetition_penalty is not None:
            msg.repetition_penalty = repetition_penalty
        return msg

    def _gen_kw(self, msg: inference_pb2.GenerateRequest) -> dict:
        """`_kw` plus the adapter as the header Ray Serve's proxy routes on (a direct server ignores it)."""
        kw = self._kw()
        # A reference longer than any valid one (name and alias up to 64 characters each,
        # or a version number) would only swell the headers past gRPC's metadata limit:
        # the server refuses it by its field, with a message that says why.
        if msg.adapter and len(msg.adapter) <= _MAX_ROUTED_REF:
            kw["metadata"] = self._metadata + (("multiplexed_model_id", msg.adapter),)
        return kw

    def generate(self, prompt: str = "", **kw) -> inference_pb2.GenerateResponse:
        """Unary generation; keyword arguments as in `request`."""
        msg = self.request(prompt, **kw)
        return self.inference.Generate(msg, **self._gen_kw(msg))

    def stream(self, prompt: str = "", **kw) -> Iterator[inference_pb2.GenerateStreamResponse]:
        """Streaming generation: token deltas, then a final message with finish_reason and usage."""
        msg = self.request(prompt, **kw)
        return self.inference.GenerateStream(msg, **self._gen_kw(msg))

    def chat(self, messages, **kw) -> inference_pb2.GenerateResponse:
        """Unary generation of the assistant's reply to `messages` ([(role, content)] or dicts)."""
        return self.generate(messages=messages, **kw)

    def model_info(self) -> inference_pb2.ModelInfo:
        """The served base: name, context length, vocabulary size, compute dtype, resident bytes."""
        return self.inference.GetModelInfo(inference_pb2.GetModelInfoRequest(), **self._kw())

    # ------------------------------------------------------------ registry
    def list_adapters(self, name: str = "") -> list[registry_pb2.AdapterInfo]:
        return list(self.registry.ListAdapters(registry_pb2.ListAdaptersRequest(name=name), **self._kw()).adapters)

    def get_adapter(self, ref: str) -> registry_pb2.AdapterInfo:
        return self.registry.GetAdapter(registry_pb2.GetAdapterRequest(adapter=ref), **self._kw())

    def register_path(self, name: str, path: str, *, owner: str = "", labels=None, set_default: bool = False,
                      public: bool = False) -> registry_pb2.AdapterInfo:
        """Register from a directory on the SERVER (inside its --allowed-adapter-root).
        public=True (admins only) makes it usable by every tenant."""
        return self.registry.RegisterAdapter(registry_pb2.RegisterAdapterRequest(
            name=name, path=path, owner=owner, labels=labels or {}, set_default=set_default, public=public),
            **self._kw())

    def upload(self, name: str, directory: str | Path, *, owner: str = "", labels=None, set_default: bool = False,
               public: bool = False) -> registry_pb2.AdapterInfo:
        """Register by streaming a LOCAL adapter directory's files to the server."""
        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}; pass a PEFT adapter directory")

        def messages():
            yield registry_pb2.UploadAdapterRequest(header=registry_pb2.UploadHeader(
                name=name, owner=owner, labels=labels or {}, set_default=set_default, public=public))
            for fname in ADAPTER_FILES:
                path = directory / fname
                if not path.is_file():
                    continue
                with path.open("rb") as fh:
                    while chunk := fh.read(_UPLOAD_CHUNK):
                        yield registry_pb2.UploadAdapterRequest(chunk=registry_pb2.FileChunk(filename=fname, data=chunk))
            for pickled in PICKLE_WEIGHTS:
                if (directory / pickled).is_file() and not (directory / WEIGHTS_FILE).is_file():
                    # Let the server explain the refusal (with how to convert).
                    yield registry_pb2.UploadAdapterRequest(chunk=registry_pb2.FileChunk(filename=pickled, data=b"\0"))

        return self.registry.UploadAdapter(messages(), **self._kw())

    def set_alias(self, name: str, alias: str, version: int) -> registry_pb2.AdapterInfo:
        return self.registry.SetAlias(registry_pb2.SetAliasRequest(name=name, alias=alias, version=version), **self._kw())

    def delete(self, name: str, version: int = 0) -> list[registry_pb2.AdapterInfo]:
        req = registry_pb2.DeleteAdapterRequest(name=name, version=version)
        return list(self.registry.DeleteAdapter(req, **self._kw()).deleted)

    def load(self, ref: str) -> registry_pb2.AdapterInfo:
        return self.registry.LoadAdapter(registry_pb2.LoadAdapterRequest(adapter=ref), **self._kw())

    def unload(self, ref: str) -> registry_pb2.AdapterInfo:
        return self.registry.UnloadAdapter(registry_pb2.UnloadAdapterRequest(adapter=ref), **self._kw())

    # ------------------------------------------------------------ training
    def submit_job(self, name: str, train_jsonl: bytes | str | Path, *, eval_jsonl: bytes | str | Path | None = None,
                   config_toml: str | Path = "", set_default: bool = False) -> training_pb2.TrainingJob:
        """Queue a QLoRA job on the server's base. `train_jsonl` / `eval_jsonl`: the data as
        bytes, or a local file path (its bytes are uploaded); `config_toml`: TOML text (str) or a
        `Path` to a .toml file (keys as the `qlora-serve train` flags)."""
        def data(v) -> bytes:
            if v is None:
                return b""
            return v if isinstance(v, bytes) else Path(v).read_bytes()

        if isinstance(config_toml, Path):
            config_toml = config_toml.read_text(encoding="utf-8")
        header = training_pb2.SubmitJobRequest(adapter_name=name, config_toml=config_toml, set_default=set_default)
        train, evaluation = data(train_jsonl), data(eval_jsonl)

        def messages():  # chunked (SubmitJobStream), so datasets may exceed gRPC's message limit
            yield training_pb2.SubmitJobStreamRequest(header=header)
            for kind, blob in ((training_pb2.DatasetChunk.DATASET_TRAIN, train),
                               (training_pb2.DatasetChunk.DATASET_EVAL, evaluation)):
                for i in range(0, len(blob), _UPLOAD_CHUNK):
                    yield training_pb2.SubmitJobStreamRequest(
                        chunk=training_pb2.DatasetChunk(dataset=kind, data=blob[i:i + _UPLOAD_CHUNK]))

        return self.training.SubmitJobStream(messages(), **self._kw())

    def watch_job(self, job_id: str) -> Iterator[training_pb2.TrainingEvent]:
        """Every event of the job so far, then new ones until it ends (no deadline unless `timeout` is set)."""
        return self.training.WatchJob(training_pb2.WatchJobRequest(id=job_id), **self._kw())

    def list_jobs(self) -> list[training_pb2.TrainingJob]:
        return list(self.training.ListJobs(training_pb2.ListJobsRequest(), **self._kw()).jobs)

    def get_job(self, job_id: str) -> training_pb2.TrainingJob:
        return self.training.GetJob(training_pb2.GetJobRequest(id=job_id), **self._kw())

    def cancel_job(self, job_id: str) -> training_pb2.TrainingJob:
        return self.training.CancelJob(training_pb2.CancelJobRequest(id=job_id), **self._kw())

    def loss_curve(self, job_id: str) -> training_pb2.JobArtifact:
        """The job's loss curve: `.data` is a PNG (train/eval loss, learning rate), `.step` its last step."""
        req = training_pb2.GetJobArtifactRequest(id=job_id, kind=training_pb2.JOB_ARTIFACT_KIND_LOSS_CURVE)
        return self.training.GetJobArtifact(req, **self._kw())


def register_adapter_dir(address: str, name: str, directory: str | Path, *, api_key: str | None = None,
                         set_default: bool = True) -> registry_pb2.AdapterInfo:
    """Upload a freshly trained adapter to a running server (used by `qlora-serve train --register`)."""
    with Client(address, api_key=api_key, timeout=300) as client:
        return client.upload(name, directory, set_default=set_default)
