"""What the code calls on a tokenizer, as a type: `Tokenizer`.

A transformers tokenizer (`PreTrainedTokenizerBase`: what `data.tokenizers.load_tokenizer`
returns, a GGUF file's and the `builtin:tiny` one included) has all of it. Not to be
confused with the `tokenizers` library's `Tokenizer` (the fast tokenizer's backend, which
`tiny_tokenizer` trains and `models.gguf` builds), which has none of the chat methods.
Imports nothing of the package, so any module can name the type.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class Tokenizer(Protocol):
    """A tokenizer as `data/`, `eval/`, the trainer and the exporters use it."""

    # `data.chat_template` replaces the tokenizer's own (`data.tokenizers.tokenizer_of`)
    chat_template: str | None

    @property
    def bos_token(self) -> str | None: ...

    @property
    def eos_token(self) -> str | None: ...

    @property
    def pad_token(self) -> str | None: ...

    @property
    def bos_token_id(self) -> int | None: ...

    @property
    def eos_token_id(self) -> int | None: ...

    @property
    def pad_token_id(self) -> int | None: ...

    def __len__(self) -> int:
        """The vocabulary with the added tokens: the ids the model's embedding must cover."""
        ...

    def __call__(self, text: str | list[str], *, add_special_tokens: bool = ...) -> Any:
        """`{"input_ids": ids}` of a text, or a list of such lists for a list of texts."""
        ...

    def apply_chat_template(self, conversation: Any, *, tokenize: bool = ..., add_generation_prompt: bool = ...,
                            return_dict: bool = ...) -> Any:
        """A conversation (list of `{role, content}` messages, or a list of them) through the
        chat template: text (`tokenize=False`), ids, or `{"input_ids": ...}` (`return_dict`)."""
        ...

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = ...) -> str: ...

    def save_pretrained(self, save_directory: str) -> Any:
        """Writes the tokenizer's files (`tokenizer.json`, `tokenizer_config.json`, ...)."""
        ...
