"""A decoder-only transformer for the Llama family in Flax NNX (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3).

`Llama(cfg, options, rngs=...)`: `model(input_ids [B, T] int32) -> hidden [B, T, D]`
after the final RMSNorm; `model.lm_head_kernel() -> [D, V]`. Log-probs are computed
from these two by `mmpo_jax.logprobs` (chunked, no [B, T, V] logits).
`model.decode(input_ids, positions, cache, slot, mask)`: the same layers with a KV
cache, for generation (`mmpo_jax.eval.generate`, which owns the cache layout and masks).

The rest of the model package: `llama_config.LlamaConfig` (the architecture, with
transformers' names, from and to a `config.json`), `options.ModelOptions` (how the
model runs: dtypes, attention kernel, scan, remat, dropout, LoRA), `attention` (the
one attention entry point and its mask spec), `layers` (parameters with logical axes,
RMSNorm, RoPE), `lora` (the adapters), `hf_weights` (transformers' tensor names and
layouts, `iter_hf_weights`), `build.build_model` (random init or a checkpoint, straight
onto the mesh), `checkpoints` / `gguf` (reading HF directories and GGUF files).

Layout. Our kernels are `[in, out]` (torch Linear weights are `[out, in]`), with the
heads split out: q `[embed, heads, head_dim]`, k/v `[embed, kv_heads, head_dim]`, o
`[heads, head_dim, embed]`, gate/up `[embed, mlp]`, down `[mlp, embed]`, the embedding
`[vocab, embed]`, the untied LM head `[embed, vocab]`. With `scan_layers` every layer
parameter has a leading `layers` axis (all layers stacked). Each parameter carries its
logical axis names in the `out_sharding` metadata (`nnx.get_partition_spec` under
`flax.core.spmd` rules, or `mmpo_jax.sharding.model_shardings`, turns them into mesh
axes).

LoRA (`ModelOptions.lora`): a targeted projection `W` (layout above) gets `<t>_lora_a`
`[*in, rank]` and `<t>_lora_b` `[rank, *out]` (`nnx.LoRAParam`, a subclass of
`nnx.Param`), and computes `x @ W + (alpha / rank) * (dropout(x) @ A) @ B`, as PEFT does;
B starts at zero. `iter_hf_weights` merges the adapters into the exported weights.

RoPE uses transformers' rotate-half convention: HF checkpoints load without any
permutation (GGUF's llama.cpp permutation is undone by the GGUF reader).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mmpo_jax.models.attention import MaskSpec, attention, cached_attention
from mmpo_jax.models.layers import (
    RMSNorm,
    apply_rope,
    apply_rope_rows,
    dropout,
    param,
    rope_inv_freq,
)
from mmpo_jax.models.llama_config import LlamaConfig
from mmpo_jax.models.lora import add_delta, add_lora_params, lora_delta
from mmpo_jax.models.options import ModelOptions


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, options: ModelOptions, scale: float, *, rngs: nnx.Rngs):
        d, h, k, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        pd = options.param_dtype
        self.q_kernel = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), pd, "normal", scale)
        self.k_kernel = param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), pd, "normal", scale)
        self.v_kernel = param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), pd, "normal", scale)
        self.o_kernel = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), pd, "normal", scale)
        self.q_bias: nnx.Param | None
        self.k_bias: nnx.Param | None
        self.v_bias: nnx.Param | None
        if cfg.attention_bias:
            self.q_bias = param(rngs, (h, hd), ("heads", "head_dim"), pd, "zeros", 0.0)
            self.k_bias = param(rngs, (k, hd), ("kv_heads", "head_dim"), pd, "zeros", 0.0)
            self.v_bias = param(rngs, (k, hd), ("kv_heads", "head_dim"), pd, "zeros", 0.0)
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        self.o_bias = param(rngs, (d,), ("norm",), pd, "zeros", 0.0) if cfg.o_bias else None
        self.q_norm: RMSNorm | None
        self.k_norm: RMSNorm | None
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, pd, rngs=rngs)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, pd, rngs=rngs)
        else:
            self.q_norm = self.k_norm = None
        add_lora_params(self, options.lora, rngs, pd, {
            "q": ((d,), ("embed",), (h, hd), ("heads", "head_dim")),
            "k": ((d,), ("embed",), (k, hd), ("kv_heads", "head_dim")),
            "v": ((d,), ("embed",), (k, hd), ("kv_heads", "head_dim")),
            "o": ((h, hd), ("heads", "head_dim"), (d,), ("embed",)),
        })
        self.lora = options.lora
        self.head_dim = hd
        self.mask = MaskSpec(causal=True, sliding_window=cfg.sliding_window)
        self.compute_dtype = options.compute_dtype
        self.implementation = options.attention_implementation(hd)

    def _project(self, x: jax.Array, lora_key: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q `[B, T, heads, head_dim]`, k, v `[B, T, kv_heads, head_dim]` of x `[B, T, D]`, before RoPE."""
        cd = self.compute_dtype

        def proj(t, kernel, bias):
            y = jnp.einsum("btd,dnh->btnh", x, kernel[...].astype(cd))
            y = add_delta(y, lora_delta(self, t, x, self.lora, lora_key, cd))
            return y if bias is None else y + bias[...].astype(cd)

        q, k = proj("q", self.q_kernel, self.q_bias), proj("k", self.k_kernel, self.k_bias)
        if self.q_norm is not None and self.k_norm is not None:  # Qwen3, over head_dim
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, proj("v", self.v_kernel, self.v_bias)

    def _output(self, out: jax.Array, lora_key: jax.Array | None) -> jax.Array:
        """The output projection of the attention `[B, T, heads, head_dim]` -> `[B, T, D]`."""
        cd = self.compute_dtype
        y = jnp.einsum("btnh,nhd->btd", out, self.o_kernel[...].astype(cd))
        y = add_delta(y, lora_delta(self, "o", out, self.lora, lora_key, cd))
        return y if self.o_bias is None else y + self.o_bias[...].astype(cd)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array,
                 lora_key: jax.Array | None = None) -> jax.Array:
        q, k, v = self._project(x, lora_key)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        out = attention(q, k, v, self.mask, scale=self.head_dim**-0.5, implementation=self.implementation)
        return self._output(out, lora_key)

    def decode(self, x: jax.Array, cos: jax.Array, sin: jax.Array, cache_k: jax.Array,
               cache_v: jax.Array, slot: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Attention with a KV cache (generation; no dropout).

        x `[B, T, D]` are the tokens of cache slots `slot .. slot+T-1` (`slot` an int32
        scalar, the same for every row: rows are left-padded); cos/sin `[B, T, head_dim]`
        at each row's own positions; cache_k/cache_v `[B, kv_heads, S, head_dim]`;
        mask `[B, T, S]` bool, True where a query may see a key slot (the caller
        handles causality, the padding and the sliding window). Returns
        `(y [B, T, D], cache_k, cache_v)` with this chunk's keys and values written.
        """
        q, k, v = self._project(x, None)
        q = apply_rope_rows(q, cos, sin)
        k = apply_rope_rows(k, cos, sin)
        start = (0, 0, slot, 0)
        # [B, T, K, H] -> the cache's [B, K, T, H]: the slot axis next to head_dim, so
        # each head's keys are one contiguous [S, H] matrix for the score matmul
        cache_k = jax.lax.dynamic_update_slice(cache_k, k.transpose(0, 2, 1, 3).astype(cache_k.dtype), start)
        cache_v = jax.lax.dynamic_update_slice(cache_v, v.transpose(0, 2, 1, 3).astype(cache_v.dtype), start)
        out = cached_attention(q, cache_k, cache_v, mask, self.mask, scale=self.head_dim**-0.5)
        return self._output(out, None), cache_k, cache_v


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, options: ModelOptions, scale: float, *, rngs: nnx.Rngs):
        d, m, pd = cfg.hidden_size, cfg.intermediate_size, options.param_dtype
        self.gate_kernel = param(rngs, (d, m), ("embed", "mlp"), pd, "normal", scale)
        self.up_kernel = param(rngs, (d, m), ("embed", "mlp"), pd, "normal", scale)
        self.down_kernel = param(rngs, (m, d), ("mlp", "embed"), pd, "normal", scale)
        add_lora_params(self, options.lora, rngs, pd, {
            "gate": ((d,), ("embed",), (m,), ("mlp",)),
            "up": ((d,), ("embed",), (m,), ("mlp",)),
            "down": ((m,), ("mlp",), (d,), ("embed",)),
        })
        self.lora = options.lora
        self.compute_dtype = options.compute_dtype

    def __call__(self, x: jax.Array, lora_key: jax.Array | None = None) -> jax.Array:
        cd = self.compute_dtype

        def proj(t, h):
            y = h @ getattr(self, f"{t}_kernel")[...].astype(cd)
            return add_delta(y, lora_delta(self, t, h, self.lora, lora_key, cd))

        return proj("down", jax.nn.silu(proj("gate", x)) * proj("up", x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, options: ModelOptions, scale: float, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, options.param_dtype, rngs=rngs)
        self.self_attn = Attention(cfg, options, scale, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, options.param_dtype, rngs=rngs
        )
        self.mlp = MLP(cfg, options, scale, rngs=rngs)
        self.dropout = options.dropout

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        k1 = k2 = k3 = k4 = None
        if dropout_key is not None:
            k1, k2, k3, k4 = jax.random.split(dropout_key, 4)
        a = self.self_attn(self.input_layernorm(x), cos, sin, k3)
        if k1 is not None and self.dropout > 0:
            a = dropout(a, self.dropout, k1)
        x = x + a
        m = self.mlp(self.post_attention_layernorm(x), k4)
        if k2 is not None and self.dropout > 0:
            m = dropout(m, self.dropout, k2)
        return x + m

    def decode(self, x: jax.Array, cos: jax.Array, sin: jax.Array, cache_k: jax.Array, cache_v: jax.Array,
               slot: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The layer on cache slots `slot..slot+T-1` (see `Attention.decode`); no dropout."""
        a, cache_k, cache_v = self.self_attn.decode(
            self.input_layernorm(x), cos, sin, cache_k, cache_v, slot, mask)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), cache_k, cache_v


def _remat_policy(name: str) -> Callable | None:
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    if name == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return None


def _layer_fn(remat: str) -> Callable:
    """`(layer, x, cos, sin, key) -> x`, rematerialised per `remat`."""

    def run(layer: DecoderLayer, x, cos, sin, key):
        return layer(x, cos, sin, key)

    if remat == "none":
        return run
    return nnx.remat(run, policy=_remat_policy(remat), prevent_cse=False)


class Llama(nnx.Module):
    """The decoder: token embedding, `num_hidden_layers` layers, final RMSNorm.

    `__call__(input_ids [B, T] int32) -> hidden [B, T, D]` (after the final norm, in
    the compute dtype). Sequences are right-padded: causal attention alone keeps real
    tokens from seeing the padding, and positions are 0..T-1 for every row.
    `lm_head_kernel() -> [D, V]` (the embedding transposed when tied).
    """

    def __init__(self, cfg: LlamaConfig, options: ModelOptions, *, rngs: nnx.Rngs,
                 init_scale: float = 0.02, mesh: jax.sharding.Mesh | None = None):
        self.cfg = cfg
        self.options = options
        # With a mesh, activations between layers are constrained to the batch axes
        # (`batch` rule of mmpo_jax.sharding): FSDP gathers weights, not activations.
        self.mesh = mesh
        pd = options.param_dtype
        s = init_scale
        self.embed_tokens = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd, "normal", s)
        # scanned: one DecoderLayer whose parameters have a leading `layers` axis
        self.layers: DecoderLayer | nnx.List[DecoderLayer]
        if options.scan_layers:
            n = cfg.num_hidden_layers

            @nnx.split_rngs(splits=n)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make(r: nnx.Rngs) -> DecoderLayer:
                return DecoderLayer(cfg, options, s, rngs=r)

            self.layers = make(rngs)
        else:
            self.layers = nnx.List(
                [DecoderLayer(cfg, options, s, rngs=rngs) for _ in range(cfg.num_hidden_layers)]
            )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, rngs=rngs)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd, "normal", s)

    def lm_head_kernel(self) -> jax.Array:
        """The LM head `[hidden, vocab]` in the compute dtype (the embedding transposed when tied)."""
        cd = self.options.compute_dtype
        if self.lm_head is None:
            return self.embed_tokens[...].astype(cd).T
        return self.lm_head[...].astype(cd)

    def rope(self, seq_len: int) -> tuple[jax.Array, jax.Array]:
        """cos, sin `[T, head_dim]` for positions 0..T-1, computed in float32."""
        pos = jnp.arange(seq_len, dtype=jnp.float32)
        # a constant of the architecture, not state: nothing to train, save or shard
        inv_freq = jnp.asarray(rope_inv_freq(self.cfg), jnp.float32)
        freqs = pos[:, None] * inv_freq[None, :]
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        cd = self.options.compute_dtype
        return jnp.cos(emb).astype(cd), jnp.sin(emb).astype(cd)

    def _constrain(self, x: jax.Array) -> jax.Array:
        if self.mesh is None:
            return x
        from mmpo_jax.sharding import logical_to_spec

        spec = logical_to_spec(("batch", "seq", "act_embed"), x.shape, self.mesh)
        return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(self.mesh, spec))

    def _embed(self, input_ids: jax.Array) -> jax.Array:
        """The token embeddings `[B, T, D]` of input_ids `[B, T]`, in the compute dtype."""
        table = self.embed_tokens[...]
        if self.mesh is not None:
            # FSDP: gather the table over `fsdp` first (as XLA does for matmul weights);
            # the lookup then splits over the vocab shards without resharding activations.
            from mmpo_jax.sharding import logical_to_spec

            spec = logical_to_spec(("vocab", None), table.shape, self.mesh)
            table = jax.lax.with_sharding_constraint(table, jax.sharding.NamedSharding(self.mesh, spec))
        return self._constrain(jnp.take(table, input_ids, axis=0).astype(self.options.compute_dtype))

    def __call__(self, input_ids: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Final hidden states `[B, T, D]`; `dropout_key` turns dropout on (training)."""
        cfg, options = self.cfg, self.options
        x = self._embed(input_ids)
        cos, sin = self.rope(input_ids.shape[1])
        n = cfg.num_hidden_layers
        use_dropout = dropout_key is not None and options.uses_dropout
        keys = jax.random.split(dropout_key, n) if dropout_key is not None and use_dropout else None
        layer_fn = _layer_fn(options.remat)
        if options.scan_layers:

            @nnx.scan(in_axes=(nnx.Carry, 0, None, None, 0 if use_dropout else None),
                      out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def body(h, layer, cos, sin, key):
                return self._constrain(layer_fn(layer, h, cos, sin, key))

            x = body(x, self.layers, cos, sin, keys)
        else:
            assert isinstance(self.layers, nnx.List)
            for i, layer in enumerate(self.layers):
                x = self._constrain(layer_fn(layer, x, cos, sin, keys[i] if keys is not None else None))
        return self._constrain(self.norm(x))

    def rope_at(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """cos, sin `[B, T, head_dim]` at positions `[B, T]` (int), as `rope` computes them."""
        inv_freq = jnp.asarray(rope_inv_freq(self.cfg), jnp.float32)
        freqs = positions.astype(jnp.float32)[..., None] * inv_freq
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        cd = self.options.compute_dtype
        return jnp.cos(emb).astype(cd), jnp.sin(emb).astype(cd)

    def decode(self, input_ids: jax.Array, positions: jax.Array, cache: tuple[jax.Array, jax.Array],
               slot: jax.Array, mask: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """The forward with a KV cache, for generation (no dropout).

        input_ids `[B, T]` int32 go to cache slots `slot..slot+T-1` (`slot` an int32
        scalar shared by all rows); positions `[B, T]` their RoPE positions (each row's
        own: a left-padded row starts at position 0 after its padding); cache `(k, v)`,
        each `[layers, B, kv_heads, S, head_dim]`; mask `[B, T, S]` bool, True where a
        query may see a key slot. Returns `(hidden [B, T, D] after the final norm, cache)`
        with this chunk's keys and values written into the cache.
        """
        x = self._embed(input_ids)
        cos, sin = self.rope_at(positions)
        cache_k, cache_v = cache
        if self.options.scan_layers:

            @nnx.scan(in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0),
                      transform_metadata={nnx.PARTITION_NAME: "layers"})
            def body(h, layer, ck, cv):
                h, ck, cv = layer.decode(h, cos, sin, ck, cv, slot, mask)
                return self._constrain(h), (ck, cv)

            x, (cache_k, cache_v) = body(x, self.layers, cache_k, cache_v)
        else:
            ks, vs = [], []
            assert isinstance(self.layers, nnx.List)
            for i, layer in enumerate(self.layers):
                x, ck, cv = layer.decode(x, cos, sin, cache_k[i], cache_v[i], slot, mask)
                x = self._constrain(x)
                ks.append(ck)
                vs.append(cv)
            cache_k, cache_v = jnp.stack(ks), jnp.stack(vs)
        return self._constrain(self.norm(x)), (cache_k, cache_v)
