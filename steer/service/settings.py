"""The server's settings: one typed schema, validated on construction with field names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from steer.backends import check_backend
from steer.errors import InvalidArgumentError


@dataclass(frozen=True)
class ServerSettings:
    """Flags of ``steer serve`` and limits applied to every request."""

    #: interface to bind
    host: str = "127.0.0.1"
    #: port to bind; 0 picks a free one (tests)
    port: int = 50051
    #: directory holding models, recipes and outputs; user paths may not leave it
    models_root: Path = Path("models")
    #: rows in one model's running batch
    max_batch: int = 16
    #: requests waiting to join a batch, per model, before RESOURCE_EXHAUSTED
    max_waiting: int = 256
    #: max_new_tokens used when a request sets 0
    default_max_new_tokens: int = 128
    #: largest max_new_tokens a request may ask for (INVALID_ARGUMENT above)
    max_new_tokens_cap: int = 2048
    #: longest prompt in tokens (RESOURCE_EXHAUSTED above)
    max_prompt_tokens: int = 8192
    #: most interventions in one request (INVALID_ARGUMENT above)
    max_interventions: int = 64
    #: most stop strings in one request
    max_stop_strings: int = 16
    #: most texts in one Features request (each list); they run between two engine steps
    max_feature_texts: int = 256
    #: largest request or response message in bytes
    max_message_bytes: int = 64 * 1024 * 1024
    #: gRPC worker threads (each open stream holds one)
    worker_threads: int = 128
    #: bearer token every rpc but health must carry; None = no auth
    token: str | None = None
    #: PEM certificate chain and private key; both set = serve over TLS
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: seconds streams get to finish on shutdown before they are cancelled
    shutdown_grace: float = 10.0
    #: the operator's named sliders (TOML, steer.service.sliders); None = none
    sliders: Path | None = None
    #: port of the OpenAI-compatible HTTP API on the same host; 0 picks a free one, None = off
    http_port: int | None = None
    #: longest wait (seconds) of an idle engine for the rest of a burst of requests, so
    #: requests sent together share one prefill (steer.service.scheduler); 0 turns it off
    admission_window: float = 0.05
    #: what runs generation: "hf" (transformers, the reference) or "vllm" (steer.backends)
    backend: str = "hf"
    #: vllm backend: GPUs one model spreads over (tensor parallel)
    tensor_parallel_size: int = 1
    #: vllm backend on CPU: KV cache size in GiB
    kv_cache_gib: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "models_root", Path(self.models_root))
        positive = (
            "max_batch",
            "max_waiting",
            "default_max_new_tokens",
            "max_new_tokens_cap",
            "max_prompt_tokens",
            "max_interventions",
            "max_stop_strings",
            "max_feature_texts",
            "max_message_bytes",
            "worker_threads",
            "tensor_parallel_size",
            "kv_cache_gib",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"must be an integer >= 1, got {value!r}", field=name)
        if not 0 <= self.port < 65536:
            raise InvalidArgumentError(f"must be in [0, 65535], got {self.port}", field="port")
        if self.http_port is not None and not 0 <= self.http_port < 65536:
            raise InvalidArgumentError(
                f"must be in [0, 65535], got {self.http_port}", field="http_port"
            )
        if self.default_max_new_tokens > self.max_new_tokens_cap:
            raise InvalidArgumentError(
                "must not exceed max_new_tokens_cap", field="default_max_new_tokens"
            )
        if self.token is not None and not self.token.strip():
            raise InvalidArgumentError("the token is empty", field="token")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidArgumentError(
                "give both tls_cert and tls_key, or neither", field="tls_cert"
            )
        if self.shutdown_grace < 0:
            raise InvalidArgumentError("must be >= 0", field="shutdown_grace")
        check_backend(self.backend)
        if not 0 <= self.admission_window <= 1:
            raise InvalidArgumentError(
                f"must be in [0, 1] seconds, got {self.admission_window}", field="admission_window"
            )

    @property
    def artifacts_dir(self) -> Path:
        """Where vector artifacts live (ids are directory names)."""
        return self.models_root / "artifacts"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"
