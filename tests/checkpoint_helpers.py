"""Tiny checkpoints for the checkpoint, GGUF and compare tests.

- `make_tokenizer()`: a byte-level BPE trained on a few sentences, ChatML special
  tokens and a chat template, as a `PreTrainedTokenizerFast`.
- `random_torch_model(kind, **cfg)`: a transformers Llama / Qwen2 / Mistral with a
  large random init (norms around 1, biases non-zero), so log-probs are far from
  uniform and layout mistakes show.
- `write_gguf(path, model, tokenizer, quantize=...)`: the model written as llama.cpp
  does (`gguf.GGUFWriter`, llama arch, q/k rows permuted, F32 or a quantised type
  per tensor), with the tokenizer and chat template in the metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Explain why the sky is blue: sunlight scatters off the molecules of the air.",
    "Write a haiku about the sea. Waves fold into foam, salt wind carries gull voices.",
    "Give me three tips for learning a new language: practise, speak, read. 1 2 3 42 2024",
    "user assistant system hello world, I'll say we've they're it's done!",
]


def make_tokenizer(vocab_size: int = 320) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
        chat_template=CHATML,
    )


def random_torch_model(kind: str = "llama", seed: int = 0, scale: float = 0.2, **overrides: Any) -> Any:
    """A tiny transformers model with a large random init (float32)."""
    import torch
    import transformers

    base = dict(
        vocab_size=211,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    base.update(overrides)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[kind]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**base)).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, scale)
    return model.eval()


def save_hf_dir(model: Any, path: Path, tokenizer: Any = None, **kwargs: Any) -> Path:
    path = Path(path)
    model.save_pretrained(str(path), **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute`, written out here on purpose
    (not imported from the code under test)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


_LAYER_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",  # Qwen3
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")
    return f"blk.{parts[2]}.{_LAYER_GGUF['.'.join(parts[3:])]}"


def write_gguf(
    path: Path,
    model: Any,
    tokenizer: Any = None,
    *,
    quantize: dict[str, Any] | None = None,
    arch: str = "llama",
    skip: tuple[str, ...] = (),
    name: str = "tiny-llama",
) -> dict[str, np.ndarray]:
    """Writes `model` (a transformers Llama) as llama.cpp would; returns the tensors a
    correct reader must give back (HF names, HF layout, float32: the originals, or
    their quantise-dequantise round trip for quantised ones)."""
    import gguf
    from gguf.quants import dequantize
    from gguf.quants import quantize as gguf_quantize

    quantize = quantize or {}
    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(0)
    if tokenizer is not None:
        vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
        tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv_: kv_[1])]
        model_json = __import__("json").loads(tokenizer.backend_tokenizer.to_str())["model"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model_json["merges"]]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
        w.add_token_merges(merges)
        w.add_bos_token_id(vocab["<|im_start|>"])
        w.add_eos_token_id(vocab["<|im_end|>"])
        w.add_unk_token_id(vocab["<|endoftext|>"])
        w.add_pad_token_id(vocab["<|im_end|>"])
        w.add_add_bos_token(False)
        w.add_chat_template(CHATML)
    expected: dict[str, np.ndarray] = {}
    for hf_name, p in model.state_dict().items():
        if hf_name in skip or (hf_name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        a = p.detach().float().numpy()
        expected[hf_name] = a
        if arch == "llama" and ".q_proj." in hf_name:
            a = _permute(a, heads)
        elif arch == "llama" and ".k_proj." in hf_name:
            a = _permute(a, kv)
        qtype = quantize.get(hf_name)
        if qtype is None:
            w.add_tensor(gguf_name(hf_name), np.ascontiguousarray(a, dtype=np.float32))
        else:
            q = gguf_quantize(np.ascontiguousarray(a, dtype=np.float32), qtype)
            w.add_tensor(gguf_name(hf_name), q, raw_dtype=qtype)
            back = dequantize(q, qtype).reshape(a.shape)
            if arch == "llama" and ".q_proj." in hf_name:
                back = _unpermute_ref(back, heads)
            elif arch == "llama" and ".k_proj." in hf_name:
                back = _unpermute_ref(back, kv)
            expected[hf_name] = back
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def _unpermute_ref(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def torch_token_logps(model: Any, ids: np.ndarray) -> np.ndarray:
    """transformers' per-token log-probs `[B, T]` aligned with ids (0 at t=0), float64."""
    import torch

    with torch.no_grad():
        t = torch.as_tensor(ids, dtype=torch.long)
        logits = model(input_ids=t).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, t[:, 1:, None])[..., 0]
    out = np.zeros(ids.shape, dtype=np.float64)
    out[:, 1:] = lp.double().numpy()
    return out


def jax_token_logps(model: Any, ids: np.ndarray) -> np.ndarray:
    import jax
    import jax.numpy as jnp

    from mmpo_jax.logprobs import model_token_logps

    from flax import nnx

    with jax.default_matmul_precision("highest"):
        logps = nnx.jit(lambda m, x: model_token_logps(m, x, chunk=16))(model, jnp.asarray(ids, dtype=jnp.int32))
    return np.asarray(logps, dtype=np.float64)


def largest_array_file(step_dir: Path) -> Path:
    """The largest array data file of an orbax step's `state` item (not its metadata)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "METADATA" not in p.name
             and "manifest" not in p.name]
    return max(files, key=lambda p: p.stat().st_size)


def flip_a_byte(path: Path) -> None:
    """One bit of the file's middle byte flipped in place: the size stays, the data does not."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
