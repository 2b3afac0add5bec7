"""Offline text for SAE training and feature search: local files, or text the model writes.

* :func:`read_corpus` -- a ``.txt`` file (one text per paragraph, blank-line separated) or a
  ``.jsonl`` file (per line: a string, or an object with ``text``, or with ``prompt`` and
  ``response``/``completion``, or with ``messages``).
* :func:`generate_corpus` -- the model answers each prompt (sampled, seeded) through the engine;
  every transcript is rendered by :func:`steer.text.render_chat` (the chat template, or the plain
  rule for a model without one), so the SAE sees the same token stream the model sees when it
  chats.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from steer.errors import InvalidArgumentError, NotFoundError
from steer.generation import Engine, GenerationRequest, run_to_end
from steer.models import ModelHandle
from steer.sampling import SamplingConfig
from steer.text import Message, render_chat


def _text_of(record: Any, where: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        if isinstance(record.get("text"), str):
            return record["text"]
        if isinstance(record.get("messages"), list):
            return "\n".join(str(m.get("content", "")) for m in record["messages"])
        if isinstance(record.get("prompt"), str):
            answer = record.get("response", record.get("completion", ""))
            return f"{record['prompt']}\n{answer}".strip()
        strings = [value for value in record.values() if isinstance(value, str)]
        if strings:
            return "\n".join(strings)
    raise InvalidArgumentError(f"{where}: expected a string or an object with text", field="corpus")


def read_corpus(path: str | Path) -> list[str]:
    """Texts of a local ``.txt`` or ``.jsonl`` file (empty texts dropped)."""
    file = Path(path)
    if not file.is_file():
        raise NotFoundError(f"corpus file {file} does not exist", field="corpus")
    content = file.read_text(encoding="utf-8")
    if file.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise InvalidArgumentError(f"{file}:{number}: {error}", field="corpus") from None
            texts.append(_text_of(record, f"{file}:{number}"))
    else:
        texts = [block.strip() for block in content.split("\n\n")]
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise InvalidArgumentError(f"corpus file {file} has no text", field="corpus")
    return texts


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-empty line (``#`` starts a comment line), or a ``.jsonl`` file of
    objects with a ``prompt`` field."""
    file = Path(path)
    if not file.is_file():
        raise NotFoundError(f"prompt file {file} does not exist", field="prompts")
    if file.suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise InvalidArgumentError(f"{file}:{number}: no prompt field", field="prompts")
            prompts.append(record["prompt"])
        return prompts
    lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise InvalidArgumentError(f"prompt file {file} has no prompts", field="prompts")
    return prompts


def generate_corpus(
    handle: ModelHandle,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 96,
    temperature: float = 0.8,
    seed: int = 0,
    max_batch: int = 16,
    progress: bool = False,
) -> list[str]:
    """The model's answers to ``prompts``, rendered as chat transcripts."""
    requests = [
        GenerationRequest(
            messages=(Message("user", prompt),),
            sampling=SamplingConfig(temperature=temperature, seed=seed + index),
            max_new_tokens=max_new_tokens,
        )
        for index, prompt in enumerate(prompts)
    ]
    engine = Engine(handle, max_batch=max_batch)
    with tqdm(
        total=len(requests), desc="generating corpus", unit="text", disable=not progress
    ) as bar:
        results = run_to_end(engine, requests, finished=lambda: bar.update(1))
    return [
        render_chat(
            handle.tokenizer,
            [Message("user", prompt), Message("assistant", result.text)],
            add_generation_prompt=False,
        )
        for prompt, result in zip(prompts, results, strict=True)
    ]
