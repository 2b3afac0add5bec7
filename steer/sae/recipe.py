"""SAE training recipes: a TOML file naming the model, the corpus and the training settings.

::

    [model]
    name = "smollm2-135m-instruct"     # offline name or local path
    dtype = "float32"

    [corpus]
    generated = true                   # the model answers the prompts below
    prompts = "data/sae_corpus/prompts.txt"   # relative to the recipe file
    samples_per_prompt = 2
    max_new_tokens = 128
    temperature = 0.8
    include_prompts = true             # the prompts themselves are texts too
    files = ["data/harmless.jsonl"]   # local .txt / .jsonl

    [sae]                              # any TrainingConfig field
    hook = "blocks.12.hook_resid_post"
    d_sae = 3072
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steer.errors import InvalidArgumentError, NotFoundError
from steer.models import ModelHandle
from steer.sae.corpus import generate_corpus, read_corpus, read_prompts
from steer.sae.training import TrainingConfig
from steer.toml_input import read_toml


@dataclass(frozen=True)
class CorpusSpec:
    """Where the training text comes from."""

    generated: bool = False
    prompts: Path | None = None
    samples_per_prompt: int = 1
    max_new_tokens: int = 128
    temperature: float = 0.8
    include_prompts: bool = True
    files: tuple[Path, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.generated and self.prompts is None:
            raise InvalidArgumentError("a generated corpus needs a prompt file", field="prompts")
        if not self.generated and not self.files:
            raise InvalidArgumentError(
                "the corpus is empty: set generated = true with prompts, or files",
                field="corpus",
            )
        for name in ("samples_per_prompt", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"must be a positive integer, got {value!r}", field=name)

    def texts(self, handle: ModelHandle, *, progress: bool = False) -> list[str]:
        texts: list[str] = []
        for file in self.files:
            texts.extend(read_corpus(file))
        if self.generated:
            assert self.prompts is not None
            prompts = read_prompts(self.prompts)
            if self.include_prompts:
                texts.extend(prompts)
            for sample in range(self.samples_per_prompt):
                texts.extend(
                    generate_corpus(
                        handle,
                        prompts,
                        max_new_tokens=self.max_new_tokens,
                        temperature=self.temperature,
                        seed=self.seed + sample * len(prompts),
                        progress=progress,
                    )
                )
        return texts


@dataclass(frozen=True)
class SaeRecipe:
    model: str
    dtype: str
    corpus: CorpusSpec
    training: TrainingConfig
    path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _table(data: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise InvalidArgumentError(f"{where}: [{name}] must be a table", field=name)
    return dict(value)


def _path(value: Any, base: Path, field_name: str) -> Path:
    if not isinstance(value, str) or not value:
        raise InvalidArgumentError(f"expected a path, got {value!r}", field=field_name)
    path = Path(value)
    return path if path.is_absolute() else base / path


def load_sae_recipe(path: str | Path) -> SaeRecipe:
    """Read and validate a recipe; errors name the offending field."""
    file = Path(path)
    if not file.is_file():
        raise NotFoundError(f"recipe {file} does not exist", field="recipe")
    data = read_toml(file, field="recipe")
    unknown = sorted(set(data) - {"model", "corpus", "sae"})
    if unknown:
        raise InvalidArgumentError(f"{file}: unknown table(s) {unknown}", field=unknown[0])
    base = file.parent
    model = _table(data, "model", str(file))
    corpus = _table(data, "corpus", str(file))
    known_corpus = set(CorpusSpec.__dataclass_fields__)
    bad = sorted(set(corpus) - known_corpus)
    if bad:
        raise InvalidArgumentError(f"{file}: unknown corpus setting(s) {bad}", field=bad[0])
    if "prompts" in corpus:
        corpus["prompts"] = _path(corpus["prompts"], base, "corpus.prompts")
    if "files" in corpus:
        if not isinstance(corpus["files"], list):
            raise InvalidArgumentError("must be a list of paths", field="corpus.files")
        corpus["files"] = tuple(_path(item, base, "corpus.files") for item in corpus["files"])
    name = model.get("name", "smollm2-135m-instruct")
    dtype = model.get("dtype", "float32")
    if not isinstance(name, str) or not isinstance(dtype, str):
        raise InvalidArgumentError("model.name and model.dtype are strings", field="model")
    return SaeRecipe(
        model=name,
        dtype=dtype,
        corpus=CorpusSpec(**corpus),
        training=TrainingConfig.from_mapping(_table(data, "sae", str(file)), f"{file} [sae]"),
        path=file,
    )
