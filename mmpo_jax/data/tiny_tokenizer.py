"""The `builtin:tiny` tokenizer: a small byte-level BPE with a chat template.

Trained on the demo data's train split by `scripts/make_demo_data.py`, for
tests and tiny models. Byte-level, so any text encodes; digits are split one by
one (as Llama 3 and SmolLM2 do), which keeps arithmetic learnable by a tiny
model.

Special tokens (fixed ids): 0 `<|pad|>`, 1 `<|bos|>`, 2 `<|eos|>`, 3 `<|system|>`,
4 `<|user|>`, 5 `<|assistant|>`. Plain encoding adds BOS in front (like
Llama 3); the chat template writes BOS itself, so chat text is encoded with
`add_special_tokens=False` (as `apply_chat_template(tokenize=True)` does). A
conversation renders as

    <|bos|><|system|>\\nYou are a helpful assistant.\\n<|user|>\\nWhat is 2 + 3?\\n<|assistant|>\\n5<|eos|>

The assistant turn ends with EOS and nothing after it, so a completion taken
from the rendered text ends with EOS; `add_generation_prompt=True` appends
`<|assistant|>\\n`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = (PAD, BOS, EOS, *(f"<|{role}|>" for role in ROLES))
VOCAB_SIZE = 2048
MODEL_MAX_LENGTH = 1024

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ('system', 'user', 'assistant') %}"
    "{{ raise_exception('builtin:tiny chat template: roles are system, user and assistant, got '"
    " + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """A byte-level BPE trained on `texts` (deterministic for the same texts)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return tokenizer


def tokenizer_config() -> dict[str, object]:
    """tokenizer_config.json: the class transformers builds, the named tokens, the template."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "model_max_length": MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def tokenizer_files(tokenizer: Tokenizer) -> dict[str, str]:
    """The files of a directory `transformers.AutoTokenizer.from_pretrained` loads."""
    return {
        "tokenizer.json": tokenizer.to_str(pretty=True) + "\n",
        "tokenizer_config.json": json.dumps(tokenizer_config(), indent=2, ensure_ascii=False)
        + "\n",
    }
